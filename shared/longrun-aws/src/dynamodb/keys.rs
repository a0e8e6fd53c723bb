//! Key construction: the attribute names of the table's keys and indexes, the fixed sort keys
//! and prefixes, and the functions that build each item's `pk`, `sk` and index keys (the
//! table in the [module docs](super)).

use std::collections::HashMap;

use chrono::{DateTime, SecondsFormat, Utc};

use longrun::ports::RequestKey;
use longrun::task::TaskId;

use super::item::{Item, s};

/// The index of a user's tasks, newest first.
pub const GSI_BY_USER: &str = "by-user";
/// The sparse index of queued and running tasks by lease expiry: the sweeper's work.
pub const GSI_BY_LEASE: &str = "by-lease";
/// The TTL attribute: epoch seconds after which DynamoDB may delete the item.
pub const TTL_ATTRIBUTE: &str = "expires_at";
/// The table's partition key.
pub const PK: &str = "pk";
/// The table's sort key.
pub const SK: &str = "sk";
/// `by-user`'s partition key: `USER#{ext}#{user}`.
pub const GSI1_PK: &str = "gsi1pk";
/// `by-user`'s sort key: the task id.
pub const GSI1_SK: &str = "gsi1sk";
/// `by-lease`'s partition key: always `LEASE`.
pub const GSI2_PK: &str = "gsi2pk";
/// `by-lease`'s sort key: `{lease_until}#{task_id}`.
pub const GSI2_SK: &str = "gsi2sk";

/// The sort key of a task record.
pub(super) const TASK_SK: &str = "TASK";
/// The sort key of a request key.
pub(super) const REQUEST_SK: &str = "REQ";
/// The sort key prefix of a task's audit items: `AUDIT#{audit_id}`.
pub(super) const AUDIT_PREFIX: &str = "AUDIT#";
/// The sort key prefix of a task's step items: `STEP#{seq:06}`.
pub(super) const STEP_PREFIX: &str = "STEP#";
/// The sort key of a user's active-task count.
pub(super) const ACTIVE_SK: &str = "ACTIVE";
/// The one partition key value of the `by-lease` index.
pub(super) const LEASE_PK: &str = "LEASE";

/// Escapes a key component that is followed by another one.
fn escape(component: &str) -> String {
    component.replace('%', "%25").replace('#', "%23")
}

/// The partition of a task: its record, audit items and steps.
pub(super) fn task_pk(task_id: &TaskId) -> String {
    format!("TASK#{task_id}")
}

/// The `by-user` partition of a user's tasks in one extension.
pub(super) fn user_pk(ext: &str, user: &str) -> String {
    format!("USER#{}#{}", escape(ext), escape(user))
}

/// The partition of a request key.
pub(super) fn request_pk(request: &RequestKey) -> String {
    format!(
        "REQ#{}#{}#{}",
        escape(&request.ext),
        escape(&request.user),
        request.request_id
    )
}

/// The partition of a user's active-task count in one extension: the ids of their queued and
/// running tasks, which the per-user limit counts.
pub(super) fn active_pk(ext: &str, user: &str) -> String {
    format!("ACTIVE#{}#{}", escape(ext), escape(user))
}

/// The partition of a user's `ctx.store` values in one extension.
pub(super) fn kv_pk(ext: &str, user: &str) -> String {
    format!("KV#{}#{}", escape(ext), escape(user))
}

/// The `by-lease` sort key of a task whose lease runs `until`: oldest lease sorts first.
pub(super) fn lease_sk(until: DateTime<Utc>, task_id: &TaskId) -> String {
    format!("{}#{task_id}", iso(until))
}

/// Millisecond ISO-8601 in UTC with a `Z`: fixed width, so strings sort as the times do.
pub(super) fn iso(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The primary key of an item: `pk` and `sk`.
pub(super) fn key(pk: String, sk: impl Into<String>) -> Item {
    HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(sk))])
}

/// The primary key of a task record.
pub(super) fn task_key(task_id: &TaskId) -> Item {
    key(task_pk(task_id), TASK_SK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_components_are_escaped() {
        assert_eq!(user_pk("a#b", "c"), "USER#a%23b#c");
        assert_ne!(user_pk("a#b", "c"), user_pk("a", "b#c"));
        assert_eq!(kv_pk("50%", "#"), "KV#50%25#%23");
    }

    #[test]
    fn times_sort_as_strings() {
        let early = DateTime::parse_from_rfc3339("2024-01-01T00:00:09.5Z").unwrap();
        let late = DateTime::parse_from_rfc3339("2024-01-01T00:00:10Z").unwrap();
        let (early, late) = (iso(early.to_utc()), iso(late.to_utc()));
        assert_eq!(early, "2024-01-01T00:00:09.500Z");
        assert!(early < late);
    }
}
