//! [`TaskStore`] on the task table: task records, leases, audit items, steps and request
//! keys, every state change one conditional write (the rules in the [module docs](super)).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::{
    AttributeValue, Put, ReturnValue, ReturnValuesOnConditionCheckFailure, TransactWriteItem,
    Update,
};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};

use longrun::ports::{
    Beat, Claim, Created, Finish, FinishGuard, LeaseHolder, Peek, PortError, PortResult,
    RequestKey, Requeue, TaskStore,
};
use longrun::task::{AuditItem, AuditKind, Lease, Progress, Task, TaskId, TaskState};
use longrun::{ActionResult, StepRecord};

use super::item::{
    Fields, Item, audit_from_item, audit_item, expiry, json_to_attribute, n, s, step_from_item,
    step_item, task_from_item, task_item,
};
use super::keys::{
    ACTIVE_SK, AUDIT_PREFIX, GSI_BY_LEASE, GSI_BY_USER, GSI1_PK, GSI1_SK, GSI2_PK, GSI2_SK,
    LEASE_SHARDS, PK, REQUEST_SK, SK, STEP_PREFIX, TTL_ATTRIBUTE, active_pk, iso, key, lease_pk,
    lease_shard_pk, lease_sk, request_pk, task_key, task_pk, user_pk,
};
use super::{built, lease_check, transact};
use crate::port_error;

/// How long a request key keeps a retried `call` from creating a second task.
const REQUEST_KEY_TTL: Duration = Duration::from_secs(86_400);
/// How long the record of a refused task is kept: long enough for the work message sent
/// beside it to find it.
const REFUSED_TTL: Duration = Duration::from_secs(86_400);

// ---------------------------------------------------------------------------------------
// Expressions
// ---------------------------------------------------------------------------------------

/// Every attribute in an expression is written `#name` (many of ours — `state`, `user`,
/// `name`, `kind` — are reserved words); this maps each placeholder to its name.
pub(super) fn names_in(expressions: &[&str]) -> HashMap<String, String> {
    let mut names = HashMap::new();
    for expression in expressions {
        let mut rest = *expression;
        while let Some(at) = rest.find('#') {
            let tail = &rest[at + 1..];
            let len = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(format!("#{}", &tail[..len]), tail[..len].to_owned());
            rest = &tail[len..];
        }
    }
    names
}

/// `#state = :state0` or `#state IN (:state0, :state1, …)`, and the values it uses.
fn state_in(states: &[TaskState]) -> (String, Vec<(String, AttributeValue)>) {
    let values: Vec<(String, AttributeValue)> = states
        .iter()
        .enumerate()
        .map(|(i, state)| (format!(":state{i}"), s(state.as_str())))
        .collect();
    let list: Vec<&str> = values.iter().map(|(k, _)| k.as_str()).collect();
    let condition = match list.as_slice() {
        [one] => format!("#state = {one}"),
        many => format!("#state IN ({})", many.join(", ")),
    };
    (condition, values)
}

/// Whether a lease lapsed before `:now`. A live task without a lease counts as lapsed, as in
/// memory.
const LEASE_LAPSED: &str = "(attribute_not_exists(#lease_until) OR #lease_until < :now)";

/// What a conditional update came back with.
enum Updated {
    /// The write happened; the item as it is now.
    Written(Item),
    /// The condition failed; the item as it was (`None`: there is no such item).
    Refused(Option<Item>),
}

// ---------------------------------------------------------------------------------------
// TaskStore
// ---------------------------------------------------------------------------------------

/// The task table in DynamoDB.
#[derive(Debug, Clone)]
pub struct DynamoTaskStore {
    client: Client,
    table: String,
    ttl: Duration,
}

impl DynamoTaskStore {
    /// A store over `table`; finished tasks and audit items expire `ttl` after they were
    /// written.
    pub fn new(client: Client, table: impl Into<String>, ttl: Duration) -> Self {
        Self {
            client,
            table: table.into(),
            ttl,
        }
    }

    /// Every item of a task's partition whose sort key starts with `prefix`, parsed.
    async fn partition<T>(
        &self,
        task_id: &TaskId,
        prefix: &str,
        what: &str,
        parse: fn(&Item) -> PortResult<T>,
    ) -> PortResult<Vec<T>> {
        let condition = "#pk = :pk AND begins_with(#sk, :prefix)";
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression(condition)
            .set_expression_attribute_names(Some(names_in(&[condition])))
            .expression_attribute_values(":pk", s(task_pk(task_id)))
            .expression_attribute_values(":prefix", s(prefix))
            .consistent_read(true);
        self.query(what, query, None, |item| parse(item).map(Some))
            .await
    }

    /// A PutItem that leaves an existing item alone: writing the same event twice is not an
    /// error.
    async fn put_if_absent(&self, what: &str, item: Item) -> PortResult<()> {
        let condition = "attribute_not_exists(#pk)";
        let sent = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names_in(&[condition])))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(err)
                if matches!(
                    err.as_service_error(),
                    Some(PutItemError::ConditionalCheckFailedException(_))
                ) =>
            {
                Ok(())
            }
            Err(err) => Err(port_error(what, err)),
        }
    }

    /// An UpdateItem on a task record with `ALL_NEW` on success and `ALL_OLD` on a failed
    /// condition, so a refusal tells the caller why without a second read.
    fn update_task(
        &self,
        task_id: &TaskId,
        update: &str,
        condition: &str,
        values: impl IntoIterator<Item = (String, AttributeValue)>,
    ) -> UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(task_key(task_id)))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names_in(&[update, condition])))
            .set_expression_attribute_values(Some(values.into_iter().collect()))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
    }

    /// Sends a conditional update: the item as written, or as it was when the condition
    /// failed.
    async fn send_update(
        &self,
        what: &str,
        update: UpdateItemFluentBuilder,
    ) -> PortResult<Updated> {
        match update.send().await {
            Ok(out) => out
                .attributes
                .map(Updated::Written)
                .ok_or_else(|| PortError::Permanent(format!("{what}: no item returned"))),
            Err(err) => match err.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(e)) => {
                    Ok(Updated::Refused(e.item().cloned()))
                }
                _ => Err(port_error(what, err)),
            },
        }
    }

    /// The task after a guarded write, `NotFound` if there is none, `Conflict` if the guard
    /// refused.
    async fn guarded(
        &self,
        what: &str,
        task_id: &TaskId,
        update: UpdateItemFluentBuilder,
        refusal: &str,
    ) -> PortResult<Task> {
        match self.send_update(what, update).await? {
            Updated::Written(item) => task_from_item(&item),
            Updated::Refused(None) => Err(PortError::NotFound(task_id.to_string())),
            Updated::Refused(Some(_)) => {
                tracing::debug!(%task_id, what, "conditional write refused");
                Err(PortError::Conflict(format!("task {task_id}: {refusal}")))
            }
        }
    }

    /// The Put of a request key: written if there is none or it already names `task`, and
    /// kept `REQUEST_KEY_TTL` after the task was created.
    fn request_put(&self, task: &Task, request: &RequestKey) -> PortResult<Put> {
        let condition = "attribute_not_exists(#pk) OR #task_id = :task_id";
        let item = HashMap::from([
            (PK.to_owned(), s(request_pk(request))),
            (SK.to_owned(), s(REQUEST_SK)),
            ("task_id".to_owned(), s(task.task_id.as_str())),
            ("ext".to_owned(), s(&request.ext)),
            ("user".to_owned(), s(&request.user)),
            ("request_id".to_owned(), s(&request.request_id)),
            (
                TTL_ATTRIBUTE.to_owned(),
                expiry(task.created_at, REQUEST_KEY_TTL),
            ),
        ]);
        built(
            "request key put",
            Put::builder()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression(condition)
                .set_expression_attribute_names(Some(names_in(&[condition])))
                .expression_attribute_values(":task_id", s(task.task_id.as_str()))
                .build(),
        )
    }

    /// The Put of a new task record, refused if the record exists.
    fn task_put(&self, task: &Task) -> PortResult<Put> {
        let condition = "attribute_not_exists(#pk)";
        built(
            "task put",
            Put::builder()
                .table_name(&self.table)
                .set_item(Some(task_item(task, self.ttl)?))
                .condition_expression(condition)
                .set_expression_attribute_names(Some(names_in(&[condition])))
                .build(),
        )
    }

    /// Writes the request key alone. `false` if it names another task.
    async fn put_request(&self, task: &Task, request: &RequestKey) -> PortResult<bool> {
        let put = self.request_put(task, request)?;
        let sent = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(put.item))
            .set_condition_expression(put.condition_expression)
            .set_expression_attribute_names(put.expression_attribute_names)
            .set_expression_attribute_values(put.expression_attribute_values)
            .send()
            .await;
        match sent {
            Ok(_) => Ok(true),
            Err(err)
                if matches!(
                    err.as_service_error(),
                    Some(PutItemError::ConditionalCheckFailedException(_))
                ) =>
            {
                Ok(false)
            }
            Err(err) => Err(port_error("PutItem request key", err)),
        }
    }

    /// The Update that counts `task` among its user's active tasks — with a `limit`, only if
    /// the user has fewer (or it is already counted).
    fn active_add(&self, task: &Task, limit: Option<u32>) -> PortResult<TransactWriteItem> {
        let update = "SET #ext = :ext, #user = :user ADD #tasks :ids";
        let mut add = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(active_pk(&task.ext, &task.user), ACTIVE_SK)))
            .update_expression(update)
            .expression_attribute_values(":ext", s(&task.ext))
            .expression_attribute_values(":user", s(&task.user))
            .expression_attribute_values(":ids", AttributeValue::Ss(vec![task.task_id.to_string()]))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        let mut expressions = vec![update];
        let condition =
            "attribute_not_exists(#tasks) OR size(#tasks) < :limit OR contains(#tasks, :id)";
        if let Some(limit) = limit {
            add = add
                .condition_expression(condition)
                .expression_attribute_values(":limit", n(limit))
                .expression_attribute_values(":id", s(task.task_id.as_str()));
            expressions.push(condition);
        }
        let add = built(
            "active update",
            add.set_expression_attribute_names(Some(names_in(&expressions)))
                .build(),
        )?;
        Ok(TransactWriteItem::builder().update(add).build())
    }

    /// An unconditional Put of an audit item, for a transaction.
    fn audit_put(&self, audit: &AuditItem) -> PortResult<TransactWriteItem> {
        let put = built(
            "audit put",
            Put::builder()
                .table_name(&self.table)
                .set_item(Some(audit_item(audit, self.ttl)?))
                .build(),
        )?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// The end's conditional write — with `audit`, one transaction with its audit items.
    async fn end(
        &self,
        task_id: &TaskId,
        update: &str,
        condition: &str,
        values: Vec<(String, AttributeValue)>,
        audit: &[AuditItem],
    ) -> PortResult<Task> {
        if audit.is_empty() {
            let request = self.update_task(task_id, update, condition, values);
            return self
                .guarded(
                    "UpdateItem finish",
                    task_id,
                    request,
                    "finish guard does not hold",
                )
                .await;
        }
        // The audit items say how the task ended: written in one transaction with the end
        // itself, so they exist exactly when it happened.
        let names = names_in(&[update, condition]);
        let ended = built(
            "finish update",
            Update::builder()
                .table_name(&self.table)
                .set_key(Some(task_key(task_id)))
                .update_expression(update)
                .condition_expression(condition)
                .set_expression_attribute_names(Some(names))
                .set_expression_attribute_values(Some(values.into_iter().collect()))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .build(),
        )?;
        let mut items = vec![TransactWriteItem::builder().update(ended).build()];
        for audit in audit {
            items.push(self.audit_put(audit)?);
        }
        match transact(&self.client, "TransactWriteItems finish", items).await? {
            Ok(()) => self
                .get(task_id)
                .await?
                .ok_or_else(|| PortError::NotFound(task_id.to_string())),
            Err(refused) if refused.failed(0) && refused.old(0).is_none() => {
                Err(PortError::NotFound(task_id.to_string()))
            }
            Err(_) => Err(PortError::Conflict(format!(
                "task {task_id}: finish guard does not hold"
            ))),
        }
    }

    /// Runs a query to the end or until `parse` kept `limit` items, page by page.
    async fn query<T>(
        &self,
        what: &str,
        query: QueryFluentBuilder,
        limit: Option<usize>,
        parse: impl Fn(&Item) -> PortResult<Option<T>>,
    ) -> PortResult<Vec<T>> {
        let mut found = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let mut page = query.clone().set_exclusive_start_key(start.take());
            if let Some(limit) = limit {
                let left = limit.saturating_sub(found.len());
                page = page.limit(i32::try_from(left).unwrap_or(i32::MAX));
            }
            let out = page.send().await.map_err(|e| port_error(what, e))?;
            for item in out.items() {
                if let Some(parsed) = parse(item)? {
                    found.push(parsed);
                }
            }
            match out.last_evaluated_key {
                Some(last) if !last.is_empty() && limit.is_none_or(|l| found.len() < l) => {
                    start = Some(last);
                }
                _ => return Ok(found),
            }
        }
    }
}

#[async_trait]
impl TaskStore for DynamoTaskStore {
    async fn create(
        &self,
        task: &Task,
        request: Option<&RequestKey>,
        limit: Option<u32>,
    ) -> PortResult<Created> {
        // One transaction: the record, its `created` audit item (deterministic: `at` is
        // `created_at`), the task counted among its user's active ones (within the limit),
        // and the request key.
        let created = AuditItem::new(task, "created", AuditKind::Created, task.created_at, "");
        let mut items = vec![
            TransactWriteItem::builder()
                .put(self.task_put(task)?)
                .build(),
            self.audit_put(&created)?,
            self.active_add(task, limit)?,
        ];
        if let Some(request) = request {
            items.push(
                TransactWriteItem::builder()
                    .put(self.request_put(task, request)?)
                    .build(),
            );
        }
        // A request key can vanish (TTL) or appear between our write and our read; a few
        // rounds settle it.
        for _ in 0..3 {
            let refused =
                match transact(&self.client, "TransactWriteItems create", items.clone()).await? {
                    Ok(()) => return Ok(Created::New),
                    Err(refused) => refused,
                };
            if let Some(request) = request
                && refused.failed(3)
            {
                match self.find_request(request).await? {
                    Some(existing) if existing != task.task_id => {
                        tracing::info!(task_id = %task.task_id, %existing, "duplicate request");
                        return Ok(Created::Duplicate(existing));
                    }
                    _ => continue,
                }
            }
            if refused.failed(0) {
                // The task exists (a worker wrote it from its work message first, and counted
                // it): only the request key may be missing.
                match request {
                    None => return Ok(Created::New),
                    Some(request) if self.put_request(task, request).await? => {
                        return Ok(Created::New);
                    }
                    Some(_) => continue,
                }
            }
            if refused.failed(2) {
                let active = refused
                    .old(2)
                    .and_then(|item| item.get("tasks"))
                    .and_then(|tasks| tasks.as_ss().ok())
                    .map(|ids| ids.iter().filter_map(|id| id.parse().ok()).collect())
                    .unwrap_or_default();
                return Ok(Created::AtLimit(active));
            }
        }
        Err(PortError::Conflict(format!(
            "task {}: request key kept changing",
            task.task_id
        )))
    }

    async fn refuse(
        &self,
        task: &Task,
        result: &ActionResult,
        at: DateTime<Utc>,
    ) -> PortResult<()> {
        let refused = Task {
            state: TaskState::Failed,
            result: Some(result.clone()),
            finished_at: Some(at),
            delivered_at: Some(at),
            redeliver_at: None,
            lease: None,
            ..task.clone()
        };
        let mut item = task_item(&refused, REFUSED_TTL)?;
        for index_key in [GSI1_PK, GSI1_SK, GSI2_PK, GSI2_SK] {
            item.remove(index_key);
        }
        self.put_if_absent("PutItem refused task", item).await
    }

    async fn release(&self, ext: &str, user: &str, task_id: &TaskId) -> PortResult<()> {
        let update = "DELETE #tasks :ids";
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(active_pk(ext, user), ACTIVE_SK)))
            .update_expression(update)
            .set_expression_attribute_names(Some(names_in(&[update])))
            .expression_attribute_values(":ids", AttributeValue::Ss(vec![task_id.to_string()]))
            .send()
            .await
            .map_err(|e| port_error("UpdateItem release", e))?;
        Ok(())
    }

    async fn get(&self, task_id: &TaskId) -> PortResult<Option<Task>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(task_key(task_id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| port_error("GetItem task", e))?;
        out.item.as_ref().map(task_from_item).transpose()
    }

    async fn find_request(&self, request: &RequestKey) -> PortResult<Option<TaskId>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(request_pk(request), REQUEST_SK)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| port_error("GetItem request key", e))?;
        out.item
            .as_ref()
            .map(|item| Fields::new(item).parsed("task_id"))
            .transpose()
    }

    async fn claim(
        &self,
        task_id: &TaskId,
        lease: &Lease,
        now: DateTime<Utc>,
    ) -> PortResult<Claim> {
        let update = "SET #state = :running, #attempt = if_not_exists(#attempt, :zero) + :one, \
                      #lease_owner = :owner, #lease_until = :until, \
                      #started_at = if_not_exists(#started_at, :now), #heartbeat_at = :now, \
                      #gsi2pk = :lease_pk, #gsi2sk = :lease_sk REMOVE #wake_at";
        // ISO-8601 times in UTC with a fixed width compare as strings.
        let condition = format!(
            "attribute_exists(#pk) AND (#state = :queued OR (#state = :running AND {LEASE_LAPSED}) \
             OR (#state = :sleeping AND (#wake_at <= :now OR #cancel_requested = :true)))"
        );
        let values = [
            (":running".to_owned(), s(TaskState::Running.as_str())),
            (":queued".to_owned(), s(TaskState::Queued.as_str())),
            (":sleeping".to_owned(), s(TaskState::Sleeping.as_str())),
            (":true".to_owned(), AttributeValue::Bool(true)),
            (":zero".to_owned(), n(0)),
            (":one".to_owned(), n(1)),
            (":owner".to_owned(), s(&lease.owner)),
            (":until".to_owned(), s(iso(lease.until))),
            (":now".to_owned(), s(iso(now))),
            (":lease_pk".to_owned(), s(lease_pk(task_id))),
            (":lease_sk".to_owned(), s(lease_sk(lease.until, task_id))),
        ];
        let request = self.update_task(task_id, update, &condition, values);
        Ok(match self.send_update("UpdateItem claim", request).await? {
            Updated::Written(item) => Claim::Claimed(task_from_item(&item)?),
            Updated::Refused(None) => Claim::Missing,
            Updated::Refused(Some(item)) => {
                let task = task_from_item(&item)?;
                if task.state.is_terminal() {
                    Claim::Finished(task)
                } else {
                    Claim::Busy(task)
                }
            }
        })
    }

    async fn peek(&self, task_id: &TaskId) -> PortResult<Option<Peek>> {
        const PEEKED: &str = "#state, #lease_owner, #cancel_requested";
        // Read units are billed by the whole item, projected or not; a consistent read of a
        // task record under 4 KB is one unit, a fifth of the price of the write it replaces.
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(task_key(task_id)))
            .projection_expression(PEEKED)
            .set_expression_attribute_names(Some(names_in(&[PEEKED])))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| port_error("GetItem peek", e))?;
        let Some(item) = out.item else {
            return Ok(None);
        };
        let fields = Fields::new(&item);
        Ok(Some(Peek {
            state: fields.parsed("state")?,
            lease_owner: fields.opt_s("lease_owner")?.map(str::to_owned),
            cancel_requested: fields.flag("cancel_requested")?,
        }))
    }

    async fn beat(
        &self,
        task_id: &TaskId,
        lease: &Lease,
        progress: Option<&Progress>,
        partial: Option<&serde_json::Value>,
        now: DateTime<Utc>,
    ) -> PortResult<Beat> {
        let mut update = String::from(
            "SET #lease_until = :until, #heartbeat_at = :now, #gsi2pk = :lease_pk, \
             #gsi2sk = :lease_sk",
        );
        let condition = "#state = :running AND #lease_owner = :owner";
        let mut values = vec![
            (":running".to_owned(), s(TaskState::Running.as_str())),
            (":owner".to_owned(), s(&lease.owner)),
            (":until".to_owned(), s(iso(lease.until))),
            (":now".to_owned(), s(iso(now))),
            (":lease_pk".to_owned(), s(lease_pk(task_id))),
            (":lease_sk".to_owned(), s(lease_sk(lease.until, task_id))),
        ];
        if let Some(progress) = progress {
            update.push_str(
                ", #progress_pct = :pct, #progress_message = :message, \
                 #progress_seq = if_not_exists(#progress_seq, :zero) + :one",
            );
            values.extend([
                (":pct".to_owned(), n(progress.pct)),
                (":message".to_owned(), s(&progress.message)),
                (":zero".to_owned(), n(0)),
                (":one".to_owned(), n(1)),
            ]);
        }
        if let Some(partial) = partial {
            update.push_str(", #partial = :partial");
            values.push((":partial".to_owned(), json_to_attribute(partial)));
        }
        let request = self.update_task(task_id, &update, condition, values);
        let task = self
            .guarded("UpdateItem beat", task_id, request, "lease not held")
            .await?;
        Ok(Beat {
            cancel_requested: task.cancel_requested,
            progress_seq: task.progress_seq,
        })
    }

    async fn finish(&self, task_id: &TaskId, finish: &Finish) -> PortResult<Task> {
        let from: &[TaskState] = match &finish.guard {
            FinishGuard::Owner(_) => &[TaskState::Running],
            FinishGuard::Queued => &[TaskState::Queued],
            FinishGuard::ExpiredLease => &[TaskState::Queued, TaskState::Running],
            FinishGuard::Abandoned => &[TaskState::Queued, TaskState::Sleeping, TaskState::Running],
        };
        // The guard names the states it accepts; keep only those the state machine lets move
        // to `finish.state`, so the write can never make an illegal move.
        let legal: Vec<TaskState> = from
            .iter()
            .copied()
            .filter(|s| s.transition(finish.state).is_ok())
            .collect();
        if legal.is_empty() {
            return match self.get(task_id).await? {
                None => Err(PortError::NotFound(task_id.to_string())),
                Some(task) => Err(PortError::Conflict(format!(
                    "task {task_id}: illegal task transition {} → {}",
                    task.state, finish.state
                ))),
            };
        }
        let (states, mut values) = state_in(&legal);
        let condition = match &finish.guard {
            FinishGuard::Owner(owner) => {
                values.push((":owner".to_owned(), s(owner)));
                format!("{states} AND #lease_owner = :owner")
            }
            FinishGuard::ExpiredLease => format!("{states} AND {LEASE_LAPSED}"),
            FinishGuard::Abandoned => {
                // Queued or sleeping as it is; running only once its worker's lease lapsed.
                let parts: Vec<String> = values
                    .iter()
                    .map(|(name, value)| {
                        if value.as_s().is_ok_and(|v| v == TaskState::Running.as_str()) {
                            format!("(#state = {name} AND {LEASE_LAPSED})")
                        } else {
                            format!("#state = {name}")
                        }
                    })
                    .collect();
                format!("({})", parts.join(" OR "))
            }
            FinishGuard::Queued => states,
        };
        let result = serde_json::to_value(&finish.result)
            .map_err(|e| PortError::Permanent(format!("task {task_id}: result: {e}")))?;
        // The task stays in the sweeper's index, keyed by when its result is due again, until
        // delivery marks it delivered.
        let mut set = "SET #state = :next, #result = :result, #finished_at = :now, \
                       #expires_at = :expires, #redeliver_at = :redeliver, \
                       #gsi2pk = :lease_pk, #gsi2sk = :redeliver_sk"
            .to_owned();
        // The run's last checkpoint, when it was not written yet, goes with the end.
        if let Some(progress) = &finish.progress {
            set.push_str(", #progress_pct = :pct, #progress_message = :message");
            values.push((":pct".to_owned(), n(progress.pct)));
            values.push((":message".to_owned(), s(&progress.message)));
        }
        if let Some(partial) = &finish.partial {
            set.push_str(", #partial = :partial");
            values.push((":partial".to_owned(), json_to_attribute(partial)));
        }
        let update = format!("{set} REMOVE #lease_owner, #lease_until, #wake_at");
        let update = update.as_str();
        values.extend([
            (":redeliver".to_owned(), s(iso(finish.redeliver_at))),
            (":lease_pk".to_owned(), s(lease_pk(task_id))),
            (
                ":redeliver_sk".to_owned(),
                s(lease_sk(finish.redeliver_at, task_id)),
            ),
            (":next".to_owned(), s(finish.state.as_str())),
            (":result".to_owned(), json_to_attribute(&result)),
            (":now".to_owned(), s(iso(finish.at))),
            (":expires".to_owned(), expiry(finish.at, self.ttl)),
        ]);
        let ended = self
            .end(task_id, update, &condition, values, &finish.audit)
            .await?;
        if let Err(err) = self.release(&ended.ext, &ended.user, task_id).await {
            // The count keeps a task that ended; the next refusal of this user repairs it.
            tracing::warn!(%task_id, error = %err, "active-task count not released");
        }
        Ok(ended)
    }

    async fn requeue(&self, task_id: &TaskId, guard: &Requeue, lease: &Lease) -> PortResult<Task> {
        let mut update = "SET #state = :queued, #lease_owner = :new_owner, #lease_until = :until, \
                          #gsi2pk = :lease_pk, #gsi2sk = :lease_sk"
            .to_owned();
        let mut values = vec![
            (":queued".to_owned(), s(TaskState::Queued.as_str())),
            (":running".to_owned(), s(TaskState::Running.as_str())),
            (":new_owner".to_owned(), s(&lease.owner)),
            (":until".to_owned(), s(iso(lease.until))),
            (":lease_pk".to_owned(), s(lease_pk(task_id))),
            (":lease_sk".to_owned(), s(lease_sk(lease.until, task_id))),
        ];
        let condition = match guard {
            Requeue::Owner(owner) => {
                // A hand-off to a fresh invocation is not a failed attempt.
                update.push_str(", #attempt = #attempt - :one");
                values.push((":one".to_owned(), AttributeValue::N("1".to_owned())));
                values.push((":owner".to_owned(), s(owner)));
                "#state = :running AND #lease_owner = :owner".to_owned()
            }
            Requeue::Expired(now) => {
                values.push((":now".to_owned(), s(iso(*now))));
                values.push((":sleeping".to_owned(), s(TaskState::Sleeping.as_str())));
                format!("#state IN (:queued, :running, :sleeping) AND {LEASE_LAPSED}")
            }
            Requeue::Isolate(now) => {
                update.push_str(", #isolated = :true");
                values.push((":true".to_owned(), AttributeValue::Bool(true)));
                values.push((":now".to_owned(), s(iso(*now))));
                format!("#state = :running AND {LEASE_LAPSED}")
            }
        };
        update.push_str(" REMOVE #wake_at");
        let request = self.update_task(task_id, &update, &condition, values);
        self.guarded(
            "UpdateItem requeue",
            task_id,
            request,
            "requeue guard does not hold",
        )
        .await
    }

    async fn suspend(
        &self,
        task_id: &TaskId,
        owner: &str,
        wake_at: DateTime<Utc>,
        lease: &Lease,
    ) -> PortResult<Task> {
        // A sleep is not a failed attempt: the claim that wakes it counts this one again.
        let update = "SET #state = :sleeping, #wake_at = :wake, #lease_owner = :new_owner, \
                      #lease_until = :until, #gsi2pk = :lease_pk, #gsi2sk = :lease_sk, \
                      #attempt = #attempt - :one";
        let values = [
            (":running".to_owned(), s(TaskState::Running.as_str())),
            (":sleeping".to_owned(), s(TaskState::Sleeping.as_str())),
            (":owner".to_owned(), s(owner)),
            (":wake".to_owned(), s(iso(wake_at))),
            (":new_owner".to_owned(), s(&lease.owner)),
            (":until".to_owned(), s(iso(lease.until))),
            (":lease_pk".to_owned(), s(lease_pk(task_id))),
            (":lease_sk".to_owned(), s(lease_sk(lease.until, task_id))),
            (":one".to_owned(), n(1)),
        ];
        let request = self.update_task(
            task_id,
            update,
            "#state = :running AND #lease_owner = :owner",
            values,
        );
        self.guarded("UpdateItem suspend", task_id, request, "lease not held")
            .await
    }

    async fn request_cancel(&self, task_id: &TaskId, _now: DateTime<Utc>) -> PortResult<Task> {
        let values = [
            (":running".to_owned(), s(TaskState::Running.as_str())),
            (":sleeping".to_owned(), s(TaskState::Sleeping.as_str())),
            (":true".to_owned(), AttributeValue::Bool(true)),
        ];
        let request = self.update_task(
            task_id,
            "SET #cancel_requested = :true",
            "#state IN (:running, :sleeping)",
            values,
        );
        self.guarded(
            "UpdateItem request_cancel",
            task_id,
            request,
            "neither running nor sleeping",
        )
        .await
    }

    async fn mark_delivered(&self, task_id: &TaskId, now: DateTime<Utc>) -> PortResult<bool> {
        let request = self.update_task(
            task_id,
            "SET #delivered_at = :now REMOVE #redeliver_at, #gsi2pk, #gsi2sk",
            "attribute_exists(#pk) AND attribute_not_exists(#delivered_at)",
            [(":now".to_owned(), s(iso(now)))],
        );
        match self
            .send_update("UpdateItem mark_delivered", request)
            .await?
        {
            Updated::Written(_) => Ok(true),
            Updated::Refused(Some(_)) => Ok(false),
            Updated::Refused(None) => Err(PortError::NotFound(task_id.to_string())),
        }
    }

    async fn reschedule_delivery(
        &self,
        task_id: &TaskId,
        at: Option<DateTime<Utc>>,
    ) -> PortResult<bool> {
        let (terminal, mut values) = state_in(&[
            TaskState::Succeeded,
            TaskState::Failed,
            TaskState::Cancelled,
            TaskState::TimedOut,
        ]);
        let condition = format!("{terminal} AND attribute_not_exists(#delivered_at)");
        let update = match at {
            Some(at) => {
                values.extend([
                    (":redeliver".to_owned(), s(iso(at))),
                    (":lease_pk".to_owned(), s(lease_pk(task_id))),
                    (":redeliver_sk".to_owned(), s(lease_sk(at, task_id))),
                ]);
                "SET #redeliver_at = :redeliver, #gsi2pk = :lease_pk, #gsi2sk = :redeliver_sk"
            }
            None => "REMOVE #redeliver_at, #gsi2pk, #gsi2sk",
        };
        let request = self.update_task(task_id, update, &condition, values);
        match self
            .send_update("UpdateItem reschedule_delivery", request)
            .await?
        {
            Updated::Written(_) => Ok(true),
            Updated::Refused(Some(item)) => {
                let task = task_from_item(&item)?;
                if task.delivered_at.is_some() {
                    Ok(false)
                } else {
                    Err(PortError::Conflict(format!(
                        "task {task_id}: {} has not finished",
                        task.state
                    )))
                }
            }
            Updated::Refused(None) => Err(PortError::NotFound(task_id.to_string())),
        }
    }

    async fn append_audit(&self, item: &AuditItem) -> PortResult<()> {
        // The same event written twice (a redelivered message): one item is the point.
        self.put_if_absent("PutItem audit", audit_item(item, self.ttl)?)
            .await
    }

    async fn record_step(&self, holder: &LeaseHolder, step: &StepRecord) -> PortResult<StepRecord> {
        // One transaction: the lease check on the task record and the step, put if absent.
        let condition = "attribute_not_exists(#pk)";
        let put = built(
            "step put",
            Put::builder()
                .table_name(&self.table)
                .set_item(Some(step_item(&holder.task_id, step, self.ttl)))
                .condition_expression(condition)
                .set_expression_attribute_names(Some(names_in(&[condition])))
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .build(),
        )?;
        let items = vec![
            lease_check(&self.table, holder)?,
            TransactWriteItem::builder().put(put).build(),
        ];
        match transact(&self.client, "TransactWriteItems step", items).await? {
            Ok(()) => Ok(step.clone()),
            Err(refused) if refused.failed(0) => Err(PortError::Conflict(format!(
                "task {}: lease not held",
                holder.task_id
            ))),
            // The position is taken: the stored output is the one every run must use.
            Err(refused) => match refused.old(1) {
                Some(stored) => step_from_item(stored),
                None => Err(PortError::Permanent(format!(
                    "task {}: step {} refused without its stored item",
                    holder.task_id, step.seq
                ))),
            },
        }
    }

    async fn steps(&self, task_id: &TaskId) -> PortResult<Vec<StepRecord>> {
        let mut steps = self
            .partition(task_id, STEP_PREFIX, "Query steps", step_from_item)
            .await?;
        steps.sort_by_key(|step| step.seq);
        Ok(steps)
    }

    async fn audit_trail(&self, task_id: &TaskId) -> PortResult<Vec<AuditItem>> {
        let mut trail = self
            .partition(task_id, AUDIT_PREFIX, "Query audit trail", audit_from_item)
            .await?;
        trail.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.audit_id.cmp(&b.audit_id)));
        Ok(trail)
    }

    async fn list_by_user(&self, ext: &str, user: &str, limit: usize) -> PortResult<Vec<Task>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let condition = "#gsi1pk = :pk";
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(GSI_BY_USER)
            .key_condition_expression(condition)
            .set_expression_attribute_names(Some(names_in(&[condition])))
            .expression_attribute_values(":pk", s(user_pk(ext, user)))
            .scan_index_forward(false);
        self.query("Query by-user", query, Some(limit), |item| {
            task_from_item(item).map(Some)
        })
        .await
    }

    async fn expired_leases(&self, now: DateTime<Utc>, limit: usize) -> PortResult<Vec<Task>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Every shard's oldest entries due before now (the index holds keys only)...
        let condition = "#gsi2pk = :lease_pk AND #gsi2sk < :now";
        let shards = (0..LEASE_SHARDS).map(|shard| {
            let query = self
                .client
                .query()
                .table_name(&self.table)
                .index_name(GSI_BY_LEASE)
                .key_condition_expression(condition)
                .set_expression_attribute_names(Some(names_in(&[condition])))
                .expression_attribute_values(":lease_pk", s(lease_shard_pk(shard)))
                .expression_attribute_values(":now", s(iso(now)))
                .scan_index_forward(true);
            self.query("Query by-lease", query, Some(limit), |item| {
                let sort = item.get(GSI2_SK).and_then(|v| v.as_s().ok());
                let task_id = item
                    .get(PK)
                    .and_then(|v| v.as_s().ok())
                    .and_then(|pk| pk.strip_prefix("TASK#"))
                    .and_then(|id| id.parse::<TaskId>().ok());
                Ok(sort.cloned().zip(task_id))
            })
        });
        let mut due: Vec<(String, TaskId)> = futures::future::try_join_all(shards)
            .await?
            .into_iter()
            .flatten()
            .collect();
        due.sort();
        due.truncate(limit);
        // ...then each record, read consistently: the index lags the table, so the rule is
        // checked again on what the table holds now (the sweeper's conditional writes are the
        // final word on anything that moves after). A record that does not read as a task
        // (written by hand, or by another version) is logged and passed over: oldest first,
        // it would otherwise stop every sweep from then on.
        let records = futures::stream::iter(due)
            .map(|(_, task_id)| async move {
                let out = self
                    .client
                    .get_item()
                    .table_name(&self.table)
                    .set_key(Some(task_key(&task_id)))
                    .consistent_read(true)
                    .send()
                    .await
                    .map_err(|e| port_error("GetItem task", e))?;
                Ok::<_, PortError>(out.item.and_then(|item| match task_from_item(&item) {
                    Ok(task) => Some(task),
                    Err(error) => {
                        tracing::error!(%task_id, %error, "unreadable task item in the by-lease index; the sweeper passes it over");
                        None
                    }
                }))
            })
            .buffered(10)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(records
            .into_iter()
            .flatten()
            .filter(|task| task.due_for_sweep(now))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expression_names_are_collected() {
        let names = names_in(&["SET #state = :s, #gsi2pk = :p", "attribute_exists(#pk)"]);
        assert_eq!(names.len(), 3);
        assert_eq!(names["#state"], "state");
        assert_eq!(names["#gsi2pk"], "gsi2pk");
    }
}
