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
//! tasks newest first; the sparse index `by-lease` (`gsi2pk` = `LEASE`,
//! `gsi2sk` = `{lease_until}#{task_id}`) holds only queued and running tasks, oldest lease
//! first, for the sweeper. `expires_at` (epoch seconds) is the TTL attribute.
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

use aws_sdk_dynamodb::error::BuildError;

use longrun::ports::{PortError, PortResult};

pub use item::{attribute_to_json, json_to_attribute};
pub use keys::{
    GSI_BY_LEASE, GSI_BY_USER, GSI1_PK, GSI1_SK, GSI2_PK, GSI2_SK, PK, SK, TTL_ATTRIBUTE,
};
pub use kv::DynamoKv;
pub use schema::ensure_table;
pub use tasks::DynamoTaskStore;

/// An SDK builder's result, its failure (a required field left unset) a permanent error.
fn built<T>(what: &str, built: Result<T, BuildError>) -> PortResult<T> {
    built.map_err(|e| PortError::Permanent(format!("{what}: {e}")))
}
