//! [`KvStore`] (`ctx.store`) on the task table: one item per `(ext, user, key)`, under
//! `pk = KV#{ext}#{user}` and `sk = {key}`, the value as a native DynamoDB value. A background
//! task's writes go in one transaction with a check of its lease on the task record.

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{Delete, Put, TransactWriteItem};
use serde_json::Value;

use longrun::ports::{KvStore, LeaseHolder, PortError, PortResult};

use super::item::{Fields, json_to_attribute};
use super::keys::{key, kv_pk};
use super::{built, lease_check, transact};
use crate::port_error;

/// `ctx.store` in the task table: one item per `(ext, user, key)`.
#[derive(Debug, Clone)]
pub struct DynamoKv {
    client: Client,
    table: String,
}

impl DynamoKv {
    /// A store over `table`.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }
}

#[async_trait]
impl KvStore for DynamoKv {
    async fn get(&self, ext: &str, user: &str, key_name: &str) -> PortResult<Option<Value>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(kv_pk(ext, user), key_name)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| port_error("GetItem store", e))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        let f = Fields::new(&item);
        f.json("value")?
            .map(Some)
            .ok_or_else(|| f.garbled("value", "is missing"))
    }

    async fn set(
        &self,
        ext: &str,
        user: &str,
        key_name: &str,
        value: &Value,
        holder: Option<&LeaseHolder>,
    ) -> PortResult<()> {
        let mut item = key(kv_pk(ext, user), key_name);
        item.insert("value".to_owned(), json_to_attribute(value));
        let Some(holder) = holder else {
            self.client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .send()
                .await
                .map_err(|e| port_error("PutItem store", e))?;
            return Ok(());
        };
        let put = built(
            "store put",
            Put::builder()
                .table_name(&self.table)
                .set_item(Some(item))
                .build(),
        )?;
        self.guarded(holder, TransactWriteItem::builder().put(put).build())
            .await
    }

    async fn delete(
        &self,
        ext: &str,
        user: &str,
        key_name: &str,
        holder: Option<&LeaseHolder>,
    ) -> PortResult<()> {
        let Some(holder) = holder else {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key(kv_pk(ext, user), key_name)))
                .send()
                .await
                .map_err(|e| port_error("DeleteItem store", e))?;
            return Ok(());
        };
        let delete = built(
            "store delete",
            Delete::builder()
                .table_name(&self.table)
                .set_key(Some(key(kv_pk(ext, user), key_name)))
                .build(),
        )?;
        self.guarded(holder, TransactWriteItem::builder().delete(delete).build())
            .await
    }
}

impl DynamoKv {
    /// Writes `write` in one transaction with the check that `holder` still holds its
    /// task's lease: `Conflict`, nothing written, when it does not.
    async fn guarded(&self, holder: &LeaseHolder, write: TransactWriteItem) -> PortResult<()> {
        let items = vec![lease_check(&self.table, holder)?, write];
        match transact(&self.client, "TransactWriteItems store", items).await? {
            Ok(()) => Ok(()),
            Err(_) => Err(PortError::Conflict(format!(
                "task {}: lease not held",
                holder.task_id
            ))),
        }
    }
}
