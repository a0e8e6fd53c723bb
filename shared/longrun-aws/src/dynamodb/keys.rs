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
/// The sparse index of queued and running tasks by lease expiry, and of finished ones by when
/// their undelivered result is due again: the sweeper's work. It projects the keys only.
pub const GSI_BY_LEASE: &str = "by-lease";
/// What the `by-user` index holds of a task besides its keys: what a user's task list shows.
/// Not the params (up to 128 KiB, never listed) nor the heartbeat and lease attributes, so a
/// heartbeat that carries no progress writes nothing to this index.
pub const BY_USER_ATTRIBUTES: &[&str] = &[
    "task_id",
    "ext",
    "user",
    "chat",
    "function",
    "kind",
    "event",
    "name",
    "state",
    "progress_pct",
    "progress_message",
    "progress_seq",
    "attempt",
    "cap_s",
    "cancel_requested",
    "created_at",
    "started_at",
    "finished_at",
    "delivered_at",
    "result",
    "request_id",
];
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
/// `by-lease`'s partition key: `LEASE#{shard}`, one of [`LEASE_SHARDS`].
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
/// How many partition keys the `by-lease` index spreads its tasks over. Every heartbeat moves
/// a running task's entry (its sort key is the lease's expiry): two index writes. DynamoDB
/// takes at most 1 000 write units a second on one partition key, so one key for every task
/// would cap the running tasks at about 2 500 (a 5 s heartbeat, 1 KB entries); 16 keys put
/// 10 000 running tasks at about 250 a key. The sweeper reads all 16.
pub const LEASE_SHARDS: u32 = 16;

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

/// The partition of a user's budget meters in one extension; each item's sort key is
/// `{day}#{meter}`.
pub(super) fn usage_pk(ext: &str, user: &str) -> String {
    format!("USAGE#{}#{}", escape(ext), escape(user))
}

/// The partition of a user's `ctx.store` values in one extension.
pub(super) fn kv_pk(ext: &str, user: &str) -> String {
    format!("KV#{}#{}", escape(ext), escape(user))
}

/// The `by-lease` partition key of a task: `LEASE#{shard}`, the shard a hash of its id (the
/// same on every write, and uniform: a ULID ends in 80 random bits).
pub(super) fn lease_pk(task_id: &TaskId) -> String {
    lease_shard_pk(lease_shard(task_id))
}

/// The shard of a task in the `by-lease` index, `0..LEASE_SHARDS` (FNV-1a of its id).
pub fn lease_shard(task_id: &TaskId) -> u32 {
    let hash = task_id
        .as_str()
        .bytes()
        .fold(0x811c_9dc5_u32, |hash, byte| {
            (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
        });
    hash % LEASE_SHARDS
}

/// The `by-lease` partition key of shard `shard`.
pub(super) fn lease_shard_pk(shard: u32) -> String {
    format!("LEASE#{shard:02}")
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
    fn tasks_spread_evenly_over_the_lease_shards() {
        let now = chrono::Utc::now();
        let mut counts = [0u32; LEASE_SHARDS as usize];
        for _ in 0..16_000 {
            let id = TaskId::generate(now);
            assert_eq!(lease_shard(&id), lease_shard(&id));
            counts[lease_shard(&id) as usize] += 1;
        }
        // 1 000 expected a shard; six standard deviations (~190) is a generous band.
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        assert_eq!(lease_shard_pk(3), "LEASE#03");
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
