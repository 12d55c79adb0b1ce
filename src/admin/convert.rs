//! Account state and bucket levels to the admin protocol.

use crate::accounts::{Account, Change};
use crate::limiter::DescriptorStatus;
use crate::proto::fikra::admin::v1 as pb;

pub fn account(account: &Account) -> pb::AccountState {
    pb::AccountState {
        account_id: account.id.clone(),
        tier: account.tier.clone(),
        r#override: account.overrides.map(|o| pb::Override {
            requests_per_unit: o.requests,
            tokens_per_unit: o.tokens,
            unit: o.unit.singular().to_owned(),
        }),
        revision: account.revision,
        key_count: u32::try_from(account.keys.len()).unwrap_or(u32::MAX),
    }
}

pub fn change(change: &Change) -> pb::ChangeResponse {
    pb::ChangeResponse { before: Some(account(&change.before)), after: Some(account(&change.after)), changed: change.changed }
}

pub fn bucket(status: &DescriptorStatus) -> Option<pb::BucketLevel> {
    let limit = status.limit.as_ref()?;
    Some(pb::BucketLevel {
        rule: status.facts.rule.as_deref().unwrap_or_default().to_owned(),
        meter: status.meter.as_str().to_owned(),
        limit: limit.per_window,
        unit: limit.window_text(),
        capacity: limit.params.capacity,
        remaining: status.remaining,
        reset_ms: status.reset_ms,
    })
}
