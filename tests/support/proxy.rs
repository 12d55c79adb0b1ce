//! A TCP proxy on loopback between the service and Redis that closes a
//! connection right after it forwards the first script call (`EVALSHA` or
//! `EVAL`) on it, before the reply can come back. Redis has received the
//! whole command, so it may run it, but the client sees a lost connection.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A running proxy; dropping it stops accepting connections.
pub struct DroppingProxy {
    pub addr: SocketAddr,
    /// Script calls forwarded, each followed by closing its connection.
    dropped: Arc<AtomicU64>,
    accept: JoinHandle<()>,
}

impl DroppingProxy {
    /// Starts a proxy on a free loopback port in front of `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a loopback port for the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        relay(client, server, counter).await;
                    }
                });
            }
        });
        Self { addr, dropped, accept }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Script calls forwarded so far, each on a connection that was then
    /// closed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for DroppingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies bytes both ways until the client sends a script call. That chunk
/// is forwarded with no reply relayed back, then both sockets are closed.
async fn relay(client: TcpStream, server: TcpStream, dropped: Arc<AtomicU64>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();

    let replies = tokio::spawn(async move {
        let mut buffer = vec![0_u8; 64 * 1024];
        loop {
            match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => {
                    if client_write.write_all(&buffer[..read]).await.is_err() {
                        return;
                    }
                }
            }
        }
    });

    let mut replies = replies;
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        let read = match client_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let chunk = &buffer[..read];
        if is_script_call(chunk) {
            // Stop relaying replies first, so the script's reply can never
            // reach the client, then forward the call and close.
            replies.abort();
            let _ = (&mut replies).await;
            let _ = server_write.write_all(chunk).await;
            let _ = server_write.flush().await;
            dropped.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if server_write.write_all(chunk).await.is_err() {
            break;
        }
    }
    // Dropping the halves closes both connections.
    replies.abort();
}

/// Whether a chunk of RESP carries a script call.
fn is_script_call(chunk: &[u8]) -> bool {
    let text = String::from_utf8_lossy(chunk).to_ascii_uppercase();
    text.contains("\r\nEVALSHA\r\n") || text.contains("\r\nEVAL\r\n")
}
