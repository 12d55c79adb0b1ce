//! `fikra-ratelimit admin ...`: the admin service's actions from a shell or
//! a billing script.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::json;
use tonic::Request;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::proto::fikra::admin::v1 as pb;
use crate::proto::fikra::admin::v1::account_admin_client::AccountAdminClient;

/// Options of every `admin` action.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Address of the admin port, such as 127.0.0.1:8082.
    #[arg(long, env = "FIKRA_ADMIN_ADDR", global = true, default_value = "127.0.0.1:8082")]
    pub admin_addr: String,
    /// File holding the admin bearer token.
    #[arg(long, env = "FIKRA_ADMIN_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// Print the answer as one JSON object instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub action: AdminAction,
}

#[derive(Debug, Subcommand)]
pub enum AdminAction {
    /// Record a wallet top-up: the first one promotes the account for good.
    RecordTopUp(KeyArgs),
    /// Show the key's account, tier and bucket levels (charges nothing).
    Show(KeyArgs),
    /// Give the key's account its own limits.
    SetOverride {
        #[command(flatten)]
        key: KeyArgs,
        /// Requests per unit.
        #[arg(long)]
        requests: Option<u64>,
        /// Tokens per unit.
        #[arg(long)]
        tokens: Option<u64>,
        /// Window unit: second, minute, hour, day, week, month or year.
        #[arg(long, default_value = "minute")]
        unit: String,
    },
    /// Remove the account's own limits, so its tier's apply.
    ClearOverride(KeyArgs),
    /// Link an API key to an account, so its keys share one tier.
    LinkKey {
        #[command(flatten)]
        key: KeyArgs,
        /// The account id: 1 to 64 ASCII letters, digits, `.`, `_` or `-`.
        #[arg(long)]
        account: String,
    },
}

#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The API key. It is sent to the admin port only, never logged.
    #[arg(long, env = "FIKRA_API_KEY", hide_env_values = true)]
    pub api_key: String,
    /// The domain, when several have accounts.
    #[arg(long, default_value = "")]
    pub domain: String,
}

/// Runs one admin action and prints its answer.
pub async fn run(args: AdminArgs) -> ExitCode {
    match execute(&args).await {
        Ok(output) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            if args.json {
                println!("{}", json!({ "error": error.to_string() }));
            } else {
                eprintln!("fikra-ratelimit admin: {error:#}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn execute(args: &AdminArgs) -> anyhow::Result<String> {
    let token_file = args
        .token_file
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("missing --token-file (or FIKRA_ADMIN_TOKEN_FILE): the file with the admin token"))?;
    let token = std::fs::read_to_string(token_file)
        .map_err(|error| anyhow::anyhow!("cannot read the token file {}: {error}", token_file.display()))?;
    let header: MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| anyhow::anyhow!("the token in {} has characters a header cannot carry", token_file.display()))?;
    let endpoint = if args.admin_addr.contains("://") { args.admin_addr.clone() } else { format!("http://{}", args.admin_addr) };
    let channel = Channel::from_shared(endpoint.clone())?
        .connect()
        .await
        .map_err(|error| anyhow::anyhow!("cannot connect to the admin port at {endpoint}: {error}"))?;
    let mut client = AccountAdminClient::with_interceptor(channel, move |mut request: Request<()>| {
        request.metadata_mut().insert("authorization", header.clone());
        Ok(request)
    });

    let failed = |status: tonic::Status| anyhow::anyhow!("{:?}: {}", status.code(), status.message());
    let change = match &args.action {
        AdminAction::Show(key) => {
            let request = pb::ShowRequest { api_key: key.api_key.clone(), domain: key.domain.clone() };
            let shown = client.show(request).await.map_err(failed)?.into_inner();
            return Ok(if args.json { show_json(&shown).to_string() } else { show_text(&shown) });
        }
        AdminAction::RecordTopUp(key) => {
            let request = pb::RecordTopUpRequest { api_key: key.api_key.clone(), domain: key.domain.clone() };
            client.record_top_up(request).await
        }
        AdminAction::SetOverride { key, requests, tokens, unit } => {
            let request = pb::SetOverrideRequest {
                api_key: key.api_key.clone(),
                domain: key.domain.clone(),
                requests_per_unit: *requests,
                tokens_per_unit: *tokens,
                unit: unit.clone(),
            };
            client.set_override(request).await
        }
        AdminAction::ClearOverride(key) => {
            let request = pb::ClearOverrideRequest { api_key: key.api_key.clone(), domain: key.domain.clone() };
            client.clear_override(request).await
        }
        AdminAction::LinkKey { key, account } => {
            let request = pb::LinkKeyRequest { api_key: key.api_key.clone(), domain: key.domain.clone(), account_id: account.clone() };
            client.link_key(request).await
        }
    };
    let change = change.map_err(failed)?.into_inner();
    Ok(if args.json { change_json(&change).to_string() } else { change_text(&change) })
}

fn account_json(account: Option<&pb::AccountState>) -> serde_json::Value {
    let Some(account) = account else { return serde_json::Value::Null };
    json!({
        "account_id": account.account_id,
        "tier": account.tier,
        "override": account.r#override.as_ref().map(|o| json!({
            "requests_per_unit": o.requests_per_unit,
            "tokens_per_unit": o.tokens_per_unit,
            "unit": o.unit,
        })),
        "revision": account.revision,
        "key_count": account.key_count,
    })
}

fn change_json(change: &pb::ChangeResponse) -> serde_json::Value {
    json!({ "changed": change.changed, "before": account_json(change.before.as_ref()), "after": account_json(change.after.as_ref()) })
}

fn show_json(shown: &pb::ShowResponse) -> serde_json::Value {
    let buckets: Vec<_> = shown
        .buckets
        .iter()
        .map(|b| json!({ "rule": b.rule, "meter": b.meter, "limit": b.limit, "window": b.unit, "capacity": b.capacity, "remaining": b.remaining, "reset_ms": b.reset_ms }))
        .collect();
    json!({
        "known": shown.known,
        "key_hash": shown.key_hash,
        "effective_tier": shown.effective_tier,
        "account": account_json(shown.account.as_ref()),
        "buckets": buckets,
    })
}

fn account_text(account: Option<&pb::AccountState>) -> String {
    let Some(account) = account else { return "no account".to_owned() };
    let limits = match &account.r#override {
        None => "tier limits".to_owned(),
        Some(o) => {
            let show = |value: Option<u64>| value.map_or_else(|| "tier".to_owned(), |n| n.to_string());
            format!("override: {} requests, {} tokens per {}", show(o.requests_per_unit), show(o.tokens_per_unit), o.unit)
        }
    };
    format!("account {} in tier {} ({limits}; {} key(s), revision {})", account.account_id, account.tier, account.key_count, account.revision)
}

fn change_text(change: &pb::ChangeResponse) -> String {
    if change.changed {
        format!("changed\n  before: {}\n  after:  {}", account_text(change.before.as_ref()), account_text(change.after.as_ref()))
    } else {
        format!("unchanged: {}", account_text(change.after.as_ref()))
    }
}

fn show_text(shown: &pb::ShowResponse) -> String {
    let mut out = format!("key {}\n", shown.key_hash);
    if shown.known {
        out.push_str(&format!("{}\n", account_text(shown.account.as_ref())));
    } else {
        out.push_str("no account recorded for this key\n");
    }
    out.push_str(&format!("effective tier: {}\n", shown.effective_tier));
    for b in &shown.buckets {
        out.push_str(&format!(
            "{}: {} of {} {} left (limit {} {}), full in {} ms\n",
            b.rule, b.remaining, b.capacity, b.meter, b.limit, b.unit, b.reset_ms
        ));
    }
    out.trim_end().to_owned()
}
