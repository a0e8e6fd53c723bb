//! The DynamoDB adapter: the task table (task records, leases, audit items, request keys and
//! `ctx.store` values, all in one table) behind [`TaskStore`](longrun::ports::TaskStore) and
//! [`KvStore`](longrun::ports::KvStore), the table's creation for local stacks and tools
//! ([`ensure_table`]), and every `AttributeValue` mapping.
//!
//! Every state change is one conditional write whose condition is the same rule
//! `longrun::testing::memory::MemoryTaskStore` (feature `testing`) checks, so the pipeline
//! behaves the same on both. The key design (also in `docs/task-records.md` and `template.yaml`):
//!
//! | item | `pk` | `sk` |
//! |---|---|---|
//! | task record | `TASK#{task_id}` | `TASK` |
//! | audit item | `TASK#{task_id}` | `AUDIT#{audit_id}` |
//! | request key | `REQ#{ext}#{user}#{request_id}` | `REQ` |
//! | `ctx.store` value | `KV#{ext}#{user}` | `{key}` |
//!
//! Index `by-user` (`gsi1pk` = `USER#{ext}#{user}`, `gsi1sk` = `{task_id}`) lists a user's
//! tasks newest first, projecting what a list shows ([`BY_USER_ATTRIBUTES`]); the sparse index
//! `by-lease` (`gsi2pk` = `LEASE#{shard}`, one of [`LEASE_SHARDS`]; `gsi2sk` =
//! `{lease_until}#{task_id}`, or `{redeliver_at}#{task_id}` for a finished, undelivered task)
//! holds the sweeper's work, keys only. `expires_at` (epoch seconds) is the TTL attribute.
//!
//! In keys, `ext` and `user` are escaped (`%` → `%25`, `#` → `%23`) so that a `#` inside
//! them can never make two different `(ext, user)` pairs share a key. The last component of
//! a key (`request_id`, `task_id`, the store key) is taken verbatim: nothing follows it.
//!
//! The pieces: `keys` builds the keys, `item` maps domain values to items and back, `schema`
//! creates the table, `tasks` is the [`DynamoTaskStore`] and `kv` the [`DynamoKv`].

mod item;
mod keys;
mod kv;
mod schema;
mod tasks;
mod usage;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::BuildError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{CancellationReason, ConditionCheck, TransactWriteItem};

use longrun::ports::{LeaseHolder, PortError, PortResult};
use longrun::task::TaskState;

use crate::port_error;
use item::{Item, s};

pub use item::{attribute_to_json, json_to_attribute};
pub use keys::{
    BY_USER_ATTRIBUTES, GSI_BY_LEASE, GSI_BY_USER, GSI1_PK, GSI1_SK, GSI2_PK, GSI2_SK,
    LEASE_SHARDS, PK, SK, TTL_ATTRIBUTE, lease_shard,
};
pub use kv::DynamoKv;
pub use schema::ensure_table;
pub use tasks::DynamoTaskStore;
pub use usage::DynamoUsage;

/// An SDK builder's result, its failure (a required field left unset) a permanent error.
fn built<T>(what: &str, built: Result<T, BuildError>) -> PortResult<T> {
    built.map_err(|e| PortError::Permanent(format!("{what}: {e}")))
}

fn cancelled_reason_code(reason: &CancellationReason) -> &str {
    reason.code().unwrap_or("None")
}

/// A transaction the table refused because a condition failed: for each item, in the order
/// written, whether its condition failed and (with `ALL_OLD`) the item as it was.
struct Refused(Vec<(bool, Option<Item>)>);

impl Refused {
    /// Whether the condition of the `i`-th item failed.
    fn failed(&self, i: usize) -> bool {
        self.0.get(i).is_some_and(|(failed, _)| *failed)
    }

    /// The `i`-th item as it was when its condition failed (`None`: there was none).
    fn old(&self, i: usize) -> Option<&Item> {
        self.0.get(i).and_then(|(_, item)| item.as_ref())
    }
}

/// Writes `items` in one transaction: `Ok(Ok(()))` when it committed, `Ok(Err(refused))`
/// when a condition failed (nothing was written), `Err` for anything else — a conflict with
/// another transaction or throttling is transient.
async fn transact(
    client: &Client,
    what: &str,
    items: Vec<TransactWriteItem>,
) -> PortResult<Result<(), Refused>> {
    let sent = client
        .transact_write_items()
        .set_transact_items(Some(items))
        .send()
        .await;
    let err = match sent {
        Ok(_) => return Ok(Ok(())),
        Err(err) => err,
    };
    let Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) =
        err.as_service_error()
    else {
        return Err(port_error(what, err));
    };
    let reasons = cancelled.cancellation_reasons();
    if let Some(code) = reasons
        .iter()
        .map(cancelled_reason_code)
        .find(|c| *c != "None" && *c != "ConditionalCheckFailed")
    {
        let message = format!("{what}: cancelled: {code}");
        return Err(match code {
            "TransactionConflict"
            | "ThrottlingError"
            | "ProvisionedThroughputExceeded"
            | "RequestLimitExceeded" => PortError::Transient(message),
            _ => PortError::Permanent(message),
        });
    }
    let refused = Refused(
        reasons
            .iter()
            .map(|r| {
                (
                    cancelled_reason_code(r) == "ConditionalCheckFailed",
                    r.item().cloned(),
                )
            })
            .collect(),
    );
    if !refused.0.iter().any(|(failed, _)| *failed) {
        return Err(PortError::Permanent(format!(
            "{what}: cancelled without a reason: {}",
            cancelled.message().unwrap_or_default()
        )));
    }
    Ok(Err(refused))
}

/// The transaction item that checks `holder` still holds its task's lease: the task is
/// running under that owner.
fn lease_check(table: &str, holder: &LeaseHolder) -> PortResult<TransactWriteItem> {
    let condition = "#state = :running AND #lease_owner = :owner";
    let check = built(
        "lease check",
        ConditionCheck::builder()
            .table_name(table)
            .set_key(Some(keys::task_key(&holder.task_id)))
            .condition_expression(condition)
            .set_expression_attribute_names(Some(tasks::names_in(&[condition])))
            .expression_attribute_values(":running", s(TaskState::Running.as_str()))
            .expression_attribute_values(":owner", s(&holder.owner))
            .build(),
    )?;
    Ok(TransactWriteItem::builder().condition_check(check).build())
}
