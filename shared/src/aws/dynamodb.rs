//! The DynamoDB adapter: the task table (task records, leases, audit items, request keys and
//! `ctx.store` values, all in one table) behind [`TaskStore`] and [`KvStore`], the table's
//! creation for local stacks and tools ([`ensure_table`]), and every `AttributeValue` mapping.
//!
//! Every state change is one conditional write whose condition is the same rule
//! [`MemoryTaskStore`](crate::memory::MemoryTaskStore) checks, so the pipeline behaves the same
//! on both. The key design (also in `docs/task-records.md` and `template.yaml`):
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

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{BuildError, ProvideErrorMetadata};
use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, CancellationReason, GlobalSecondaryIndex,
    IndexStatus, KeySchemaElement, KeyType, PointInTimeRecoverySpecification, Projection,
    ProjectionType, Put, ReturnValue, ReturnValuesOnConditionCheckFailure, ScalarAttributeType,
    TableStatus, TimeToLiveSpecification, TransactWriteItem,
};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;

use super::port_error;
use crate::ActionResult;
use crate::ports::{
    Beat, Claim, Created, Finish, FinishGuard, KvStore, PortError, PortResult, RequestKey, Requeue,
    TaskStore,
};
use crate::step::StepRecord;
use crate::task::{AuditItem, AuditKind, Lease, Progress, Task, TaskId, TaskKind, TaskState};

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

/// How long a request key keeps a retried `call` from creating a second task.
const REQUEST_KEY_TTL: Duration = Duration::from_secs(86_400);
/// How long [`ensure_table`] waits for the table to become active.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

const TASK_SK: &str = "TASK";
const REQUEST_SK: &str = "REQ";
const AUDIT_PREFIX: &str = "AUDIT#";
const STEP_PREFIX: &str = "STEP#";
const LEASE_PK: &str = "LEASE";

type Item = HashMap<String, AttributeValue>;

// ---------------------------------------------------------------------------------------
// Keys and scalar encodings
// ---------------------------------------------------------------------------------------

/// Escapes a key component that is followed by another one.
fn escape(component: &str) -> String {
    component.replace('%', "%25").replace('#', "%23")
}

fn task_pk(task_id: &TaskId) -> String {
    format!("TASK#{task_id}")
}

fn user_pk(ext: &str, user: &str) -> String {
    format!("USER#{}#{}", escape(ext), escape(user))
}

fn request_pk(request: &RequestKey) -> String {
    format!(
        "REQ#{}#{}#{}",
        escape(&request.ext),
        escape(&request.user),
        request.request_id
    )
}

fn kv_pk(ext: &str, user: &str) -> String {
    format!("KV#{}#{}", escape(ext), escape(user))
}

fn lease_sk(until: DateTime<Utc>, task_id: &TaskId) -> String {
    format!("{}#{task_id}", iso(until))
}

/// Millisecond ISO-8601 in UTC with a `Z`: fixed width, so strings sort as the times do.
fn iso(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Epoch seconds `ttl` after `at`, for the TTL attribute.
fn expiry(at: DateTime<Utc>, ttl: Duration) -> AttributeValue {
    let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    n(at.timestamp().saturating_add(secs))
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn key(pk: String, sk: impl Into<String>) -> Item {
    HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(sk))])
}

fn task_key(task_id: &TaskId) -> Item {
    key(task_pk(task_id), TASK_SK)
}

fn kind_name(kind: TaskKind) -> &'static str {
    match kind {
        TaskKind::Function => "function",
        TaskKind::Job => "job",
    }
}

fn built<T>(what: &str, built: Result<T, BuildError>) -> PortResult<T> {
    built.map_err(|e| PortError::Permanent(format!("{what}: {e}")))
}

// ---------------------------------------------------------------------------------------
// JSON <-> AttributeValue
// ---------------------------------------------------------------------------------------

/// A JSON value as a native DynamoDB value, so operators read `result` and `params` as maps.
pub fn json_to_attribute(value: &Value) -> AttributeValue {
    match value {
        Value::Null => AttributeValue::Null(true),
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Number(number) => AttributeValue::N(number.to_string()),
        Value::String(text) => AttributeValue::S(text.clone()),
        Value::Array(items) => AttributeValue::L(items.iter().map(json_to_attribute).collect()),
        Value::Object(fields) => AttributeValue::M(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), json_to_attribute(v)))
                .collect(),
        ),
    }
}

/// A DynamoDB value as JSON. Binary values have no JSON form and are refused.
pub fn attribute_to_json(attribute: &AttributeValue) -> Result<Value, String> {
    Ok(match attribute {
        AttributeValue::Null(_) => Value::Null,
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::N(text) => number_to_json(text)?,
        AttributeValue::S(text) => Value::String(text.clone()),
        AttributeValue::L(items) => Value::Array(
            items
                .iter()
                .map(attribute_to_json)
                .collect::<Result<_, _>>()?,
        ),
        AttributeValue::M(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), attribute_to_json(v)?)))
                .collect::<Result<_, String>>()?,
        ),
        // Never written by this adapter, but a set read as a list loses nothing a reader needs.
        AttributeValue::Ss(items) => {
            Value::Array(items.iter().cloned().map(Value::String).collect())
        }
        AttributeValue::Ns(items) => Value::Array(
            items
                .iter()
                .map(|t| number_to_json(t))
                .collect::<Result<_, _>>()?,
        ),
        _ => return Err("holds a value with no JSON form (binary or unknown type)".to_owned()),
    })
}

fn number_to_json(text: &str) -> Result<Value, String> {
    if let Ok(i) = text.parse::<i64>() {
        return Ok(Value::from(i));
    }
    if let Ok(u) = text.parse::<u64>() {
        return Ok(Value::from(u));
    }
    text.parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map(Value::Number)
        .ok_or_else(|| format!("holds {text:?}, which is not a JSON number"))
}

// ---------------------------------------------------------------------------------------
// Task, audit item <-> item
// ---------------------------------------------------------------------------------------

fn task_item(task: &Task, ttl: Duration) -> PortResult<Item> {
    let mut item = task_key(&task.task_id);
    let mut put = |name: &str, value: AttributeValue| {
        item.insert(name.to_owned(), value);
    };
    put(GSI1_PK, s(user_pk(&task.ext, &task.user)));
    put(GSI1_SK, s(task.task_id.as_str()));
    put("task_id", s(task.task_id.as_str()));
    put("ext", s(&task.ext));
    put("user", s(&task.user));
    put("chat", s(&task.chat));
    put("function", s(&task.function));
    put("kind", s(kind_name(task.kind)));
    if let Some(event) = &task.event {
        put("event", s(event));
    }
    if let Some(name) = &task.name {
        put("name", s(name));
    }
    put("state", s(task.state.as_str()));
    put("progress_pct", n(task.progress.pct));
    put("progress_message", s(&task.progress.message));
    put("progress_seq", n(task.progress_seq));
    put("attempt", n(task.attempt));
    put("cap_s", n(task.cap_s));
    put(
        "cancel_requested",
        AttributeValue::Bool(task.cancel_requested),
    );
    put("created_at", s(iso(task.created_at)));
    for (name, at) in [
        ("started_at", task.started_at),
        ("heartbeat_at", task.heartbeat_at),
        ("finished_at", task.finished_at),
        ("delivered_at", task.delivered_at),
    ] {
        if let Some(at) = at {
            put(name, s(iso(at)));
        }
    }
    if let Some(result) = &task.result {
        let value = serde_json::to_value(result)
            .map_err(|e| PortError::Permanent(format!("task {}: result: {e}", task.task_id)))?;
        put("result", json_to_attribute(&value));
    }
    put("params", json_to_attribute(&task.params));
    if let Some(lease) = &task.lease {
        put("lease_owner", s(&lease.owner));
        put("lease_until", s(iso(lease.until)));
        // Only live tasks belong in the sweeper's index.
        if !task.state.is_terminal() {
            put(GSI2_PK, s(LEASE_PK));
            put(GSI2_SK, s(lease_sk(lease.until, &task.task_id)));
        }
    }
    if let Some(request_id) = &task.request_id {
        put("request_id", s(request_id));
    }
    if task.state.is_terminal()
        && let Some(finished_at) = task.finished_at
    {
        put(TTL_ATTRIBUTE, expiry(finished_at, ttl));
    }
    Ok(item)
}

/// Reads typed attributes out of an item; every failure names the item's key, never a value.
struct Fields<'a> {
    item: &'a Item,
}

impl<'a> Fields<'a> {
    fn new(item: &'a Item) -> Self {
        Self { item }
    }

    fn garbled(&self, name: &str, what: &str) -> PortError {
        let key_part = |k: &str| match self.item.get(k) {
            Some(AttributeValue::S(v)) => v.as_str(),
            _ => "?",
        };
        PortError::Permanent(format!(
            "item {}/{}: attribute {name} {what}",
            key_part(PK),
            key_part(SK)
        ))
    }

    fn opt_s(&self, name: &str) -> PortResult<Option<&'a str>> {
        match self.item.get(name) {
            None => Ok(None),
            Some(AttributeValue::S(v)) => Ok(Some(v.as_str())),
            Some(_) => Err(self.garbled(name, "is not a string")),
        }
    }

    fn s(&self, name: &str) -> PortResult<&'a str> {
        self.opt_s(name)?
            .ok_or_else(|| self.garbled(name, "is missing"))
    }

    fn parsed<T: FromStr>(&self, name: &str) -> PortResult<T> {
        self.s(name)?
            .parse()
            .map_err(|_| self.garbled(name, "does not parse"))
    }

    fn opt_n<T: FromStr>(&self, name: &str) -> PortResult<Option<T>> {
        match self.item.get(name) {
            None => Ok(None),
            Some(AttributeValue::N(v)) => v
                .parse()
                .map(Some)
                .map_err(|_| self.garbled(name, "is out of range")),
            Some(_) => Err(self.garbled(name, "is not a number")),
        }
    }

    fn n<T: FromStr>(&self, name: &str) -> PortResult<T> {
        self.opt_n(name)?
            .ok_or_else(|| self.garbled(name, "is missing"))
    }

    fn flag(&self, name: &str) -> PortResult<bool> {
        match self.item.get(name) {
            None => Ok(false),
            Some(AttributeValue::Bool(b)) => Ok(*b),
            Some(_) => Err(self.garbled(name, "is not a boolean")),
        }
    }

    fn opt_time(&self, name: &str) -> PortResult<Option<DateTime<Utc>>> {
        self.opt_s(name)?
            .map(|text| {
                DateTime::parse_from_rfc3339(text)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| self.garbled(name, "is not an ISO-8601 time"))
            })
            .transpose()
    }

    fn time(&self, name: &str) -> PortResult<DateTime<Utc>> {
        self.opt_time(name)?
            .ok_or_else(|| self.garbled(name, "is missing"))
    }

    fn json(&self, name: &str) -> PortResult<Option<Value>> {
        self.item
            .get(name)
            .map(|a| attribute_to_json(a).map_err(|what| self.garbled(name, &what)))
            .transpose()
    }
}

fn task_from_item(item: &Item) -> PortResult<Task> {
    let f = Fields::new(item);
    let kind = match f.s("kind")? {
        "function" => TaskKind::Function,
        "job" => TaskKind::Job,
        _ => return Err(f.garbled("kind", "is not function or job")),
    };
    let result = f
        .json("result")?
        .map(serde_json::from_value::<ActionResult>)
        .transpose()
        .map_err(|_| f.garbled("result", "is not an ActionResult"))?;
    let lease = match (f.opt_s("lease_owner")?, f.opt_time("lease_until")?) {
        (Some(owner), Some(until)) => Some(Lease {
            owner: owner.to_owned(),
            until,
        }),
        (None, None) => None,
        _ => return Err(f.garbled("lease_owner", "comes without lease_until or vice versa")),
    };
    Ok(Task {
        task_id: f.parsed("task_id")?,
        ext: f.s("ext")?.to_owned(),
        user: f.s("user")?.to_owned(),
        chat: f.s("chat")?.to_owned(),
        function: f.s("function")?.to_owned(),
        kind,
        event: f.opt_s("event")?.map(str::to_owned),
        name: f.opt_s("name")?.map(str::to_owned),
        state: f.parsed("state")?,
        progress: Progress {
            pct: f.opt_n("progress_pct")?.unwrap_or(0),
            message: f.opt_s("progress_message")?.unwrap_or_default().to_owned(),
        },
        progress_seq: f.opt_n("progress_seq")?.unwrap_or(0),
        attempt: f.n("attempt")?,
        cap_s: f.n("cap_s")?,
        cancel_requested: f.flag("cancel_requested")?,
        created_at: f.time("created_at")?,
        started_at: f.opt_time("started_at")?,
        heartbeat_at: f.opt_time("heartbeat_at")?,
        finished_at: f.opt_time("finished_at")?,
        delivered_at: f.opt_time("delivered_at")?,
        result,
        params: f.json("params")?.unwrap_or(Value::Null),
        lease,
        request_id: f.opt_s("request_id")?.map(str::to_owned),
    })
}

fn audit_item(audit: &AuditItem, ttl: Duration) -> PortResult<Item> {
    let kind = match serde_json::to_value(audit.kind) {
        Ok(Value::String(kind)) => kind,
        _ => {
            return Err(PortError::Permanent(format!(
                "audit {}/{}: kind has no name",
                audit.task_id, audit.audit_id
            )));
        }
    };
    let mut item = key(
        task_pk(&audit.task_id),
        format!("{AUDIT_PREFIX}{}", audit.audit_id),
    );
    item.extend([
        ("task_id".to_owned(), s(audit.task_id.as_str())),
        ("audit_id".to_owned(), s(&audit.audit_id)),
        ("kind".to_owned(), s(kind)),
        ("at".to_owned(), s(iso(audit.at))),
        ("ext".to_owned(), s(&audit.ext)),
        ("user".to_owned(), s(&audit.user)),
        ("chat".to_owned(), s(&audit.chat)),
        ("detail".to_owned(), s(&audit.detail)),
        (TTL_ATTRIBUTE.to_owned(), expiry(audit.at, ttl)),
    ]);
    Ok(item)
}

/// A step item: `pk = TASK#{task_id}`, `sk = STEP#{seq:06}` (zero-padded, so steps sort in
/// order), with the step's name, output and time, and the task's TTL.
fn step_item(task_id: &TaskId, step: &StepRecord, ttl: Duration) -> Item {
    let mut item = key(task_pk(task_id), format!("{STEP_PREFIX}{:06}", step.seq));
    item.extend([
        ("task_id".to_owned(), s(task_id.as_str())),
        ("seq".to_owned(), AttributeValue::N(step.seq.to_string())),
        ("name".to_owned(), s(&step.name)),
        ("output".to_owned(), json_to_attribute(&step.output)),
        ("at".to_owned(), s(iso(step.at))),
        (TTL_ATTRIBUTE.to_owned(), expiry(step.at, ttl)),
    ]);
    item
}

fn step_from_item(item: &Item) -> PortResult<StepRecord> {
    let f = Fields::new(item);
    Ok(StepRecord {
        seq: f.n("seq")?,
        name: f.s("name")?.to_owned(),
        output: f.json("output")?.unwrap_or(Value::Null),
        at: f.time("at")?,
    })
}

fn audit_from_item(item: &Item) -> PortResult<AuditItem> {
    let f = Fields::new(item);
    let kind: AuditKind = serde_json::from_value(Value::String(f.s("kind")?.to_owned()))
        .map_err(|_| f.garbled("kind", "is not an audit kind"))?;
    Ok(AuditItem {
        task_id: f.parsed("task_id")?,
        audit_id: f.s("audit_id")?.to_owned(),
        kind,
        at: f.time("at")?,
        ext: f.s("ext")?.to_owned(),
        user: f.s("user")?.to_owned(),
        chat: f.s("chat")?.to_owned(),
        detail: f.s("detail")?.to_owned(),
    })
}

// ---------------------------------------------------------------------------------------
// Expressions
// ---------------------------------------------------------------------------------------

/// Every attribute in an expression is written `#name` (many of ours — `state`, `user`,
/// `name`, `kind` — are reserved words); this maps each placeholder to its name.
fn names_in(expressions: &[&str]) -> HashMap<String, String> {
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

fn cancelled_reason_code(reason: &CancellationReason) -> &str {
    reason.code().unwrap_or("None")
}

// ---------------------------------------------------------------------------------------
// Table creation
// ---------------------------------------------------------------------------------------

/// Creates the task table (on-demand, with the `by-user` and `by-lease` indexes, TTL on
/// `expires_at` and point-in-time recovery) unless it exists, and waits until it is active.
/// Returns whether it created it. An endpoint that refuses TTL or point-in-time recovery (an
/// emulator) gets a warning, not an error: neither changes what the adapter does.
pub async fn ensure_table(client: &Client, table: &str) -> PortResult<bool> {
    if table_exists(client, table).await? {
        wait_active(client, table).await?;
        return Ok(false);
    }
    let attribute = |name: &str| {
        built(
            "attribute definition",
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build(),
        )
    };
    let key_element = |name: &str, key_type: KeyType| {
        built(
            "key schema",
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(key_type)
                .build(),
        )
    };
    let index = |name: &str, pk: &str, sk: &str| -> PortResult<GlobalSecondaryIndex> {
        built(
            "index",
            GlobalSecondaryIndex::builder()
                .index_name(name)
                .key_schema(key_element(pk, KeyType::Hash)?)
                .key_schema(key_element(sk, KeyType::Range)?)
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::All)
                        .build(),
                )
                .build(),
        )
    };
    let created = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .key_schema(key_element(PK, KeyType::Hash)?)
        .key_schema(key_element(SK, KeyType::Range)?)
        .set_attribute_definitions(Some(
            [PK, SK, GSI1_PK, GSI1_SK, GSI2_PK, GSI2_SK]
                .into_iter()
                .map(attribute)
                .collect::<PortResult<Vec<_>>>()?,
        ))
        .global_secondary_indexes(index(GSI_BY_USER, GSI1_PK, GSI1_SK)?)
        .global_secondary_indexes(index(GSI_BY_LEASE, GSI2_PK, GSI2_SK)?)
        .send()
        .await;
    match created {
        Ok(_) => {}
        // Someone else created it between our check and our create.
        Err(err)
            if matches!(
                err.as_service_error(),
                Some(CreateTableError::ResourceInUseException(_))
            ) =>
        {
            wait_active(client, table).await?;
            return Ok(false);
        }
        Err(err) => return Err(port_error("CreateTable", err)),
    }
    wait_active(client, table).await?;
    tracing::info!(table, "task table created");

    let ttl = built(
        "ttl specification",
        TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name(TTL_ATTRIBUTE)
            .build(),
    )?;
    if let Err(err) = client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(ttl)
        .send()
        .await
    {
        let err = port_error("UpdateTimeToLive", err);
        tracing::warn!(table, error = %err, "TTL not enabled; finished tasks will not expire");
    }
    enable_point_in_time_recovery(client, table).await?;
    Ok(true)
}

async fn enable_point_in_time_recovery(client: &Client, table: &str) -> PortResult<()> {
    let spec = built(
        "point-in-time recovery specification",
        PointInTimeRecoverySpecification::builder()
            .point_in_time_recovery_enabled(true)
            .build(),
    )?;
    // A new table's backups take a moment to become available on real DynamoDB.
    for attempt in 1..=5 {
        match client
            .update_continuous_backups()
            .table_name(table)
            .point_in_time_recovery_specification(spec.clone())
            .send()
            .await
        {
            Ok(_) => return Ok(()),
            Err(err)
                if attempt < 5 && err.code() == Some("ContinuousBackupsUnavailableException") =>
            {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(err) => {
                let err = port_error("UpdateContinuousBackups", err);
                tracing::warn!(table, error = %err, "point-in-time recovery not enabled");
                return Ok(());
            }
        }
    }
    Ok(())
}

async fn table_exists(client: &Client, table: &str) -> PortResult<bool> {
    match client.describe_table().table_name(table).send().await {
        Ok(_) => Ok(true),
        Err(err)
            if matches!(
                err.as_service_error(),
                Some(DescribeTableError::ResourceNotFoundException(_))
            ) =>
        {
            Ok(false)
        }
        Err(err) => Err(port_error("DescribeTable", err)),
    }
}

async fn wait_active(client: &Client, table: &str) -> PortResult<()> {
    let deadline = tokio::time::Instant::now() + ACTIVE_TIMEOUT;
    loop {
        let described = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| port_error("DescribeTable", e))?;
        if let Some(t) = described.table()
            && t.table_status() == Some(&TableStatus::Active)
            && t.global_secondary_indexes()
                .iter()
                .all(|i| i.index_status().is_none_or(|s| *s == IndexStatus::Active))
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(PortError::Transient(format!(
                "table {table} not active after {}s",
                ACTIVE_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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

    /// An UpdateItem on a task record with `ALL_NEW` on success and `ALL_OLD` on a failed
    /// condition, so a refusal tells the caller why without a second read.
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
    async fn create(&self, task: &Task, request: Option<&RequestKey>) -> PortResult<Created> {
        let task_put = self.task_put(task)?;
        // The `created` audit item is deterministic (`at` = `created_at`), so writing it
        // unconditionally, beside the record, is idempotent and costs no extra round trip.
        let created = AuditItem::new(task, "created", AuditKind::Created, task.created_at, "");
        let audit_item = audit_item(&created, self.ttl)?;
        let Some(request) = request else {
            let task_write = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(task_put.item))
                .set_condition_expression(task_put.condition_expression)
                .set_expression_attribute_names(task_put.expression_attribute_names)
                .send();
            let audit_write = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(audit_item))
                .send();
            let (sent, audited) = tokio::join!(task_write, audit_write);
            if let Err(err) = audited {
                tracing::warn!(task_id = %task.task_id, error = %port_error("PutItem audit", err), "created audit item not written");
            }
            return match sent {
                Ok(_) => Ok(Created::New),
                // A worker wrote it from its work message first: the same task.
                Err(err)
                    if matches!(
                        err.as_service_error(),
                        Some(PutItemError::ConditionalCheckFailedException(_))
                    ) =>
                {
                    Ok(Created::New)
                }
                Err(err) => Err(port_error("PutItem task", err)),
            };
        };
        let request_put = self.request_put(task, request)?;
        let audit_put = built(
            "audit put",
            Put::builder()
                .table_name(&self.table)
                .set_item(Some(audit_item))
                .build(),
        )?;
        // A request key can vanish (TTL) or appear between our write and our read; a few
        // rounds settle it.
        for _ in 0..3 {
            let sent = self
                .client
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().put(task_put.clone()).build())
                .transact_items(
                    TransactWriteItem::builder()
                        .put(request_put.clone())
                        .build(),
                )
                .transact_items(TransactWriteItem::builder().put(audit_put.clone()).build())
                .send()
                .await;
            let err = match sent {
                Ok(_) => return Ok(Created::New),
                Err(err) => err,
            };
            let Some(TransactWriteItemsError::TransactionCanceledException(cancelled)) =
                err.as_service_error()
            else {
                return Err(port_error("TransactWriteItems create", err));
            };
            let reasons = cancelled.cancellation_reasons();
            let failed = |i: usize| {
                reasons
                    .get(i)
                    .is_some_and(|r| cancelled_reason_code(r) == "ConditionalCheckFailed")
            };
            let (task_failed, request_failed) = (failed(0), failed(1));
            let other = reasons
                .iter()
                .map(cancelled_reason_code)
                .find(|c| *c != "None" && *c != "ConditionalCheckFailed");
            if let Some(code) = other {
                let message = format!("TransactWriteItems create: cancelled: {code}");
                return Err(match code {
                    "TransactionConflict"
                    | "ThrottlingError"
                    | "ProvisionedThroughputExceeded"
                    | "RequestLimitExceeded" => PortError::Transient(message),
                    _ => PortError::Permanent(message),
                });
            }
            if request_failed {
                match self.find_request(request).await? {
                    Some(existing) if existing != task.task_id => {
                        tracing::info!(task_id = %task.task_id, %existing, "duplicate request");
                        return Ok(Created::Duplicate(existing));
                    }
                    _ => continue,
                }
            }
            if task_failed {
                // The task exists (a worker recovered it): only the request key is missing.
                if self.put_request(task, request).await? {
                    return Ok(Created::New);
                }
                continue;
            }
            return Err(PortError::Permanent(format!(
                "TransactWriteItems create: cancelled without a reason: {}",
                cancelled.message().unwrap_or_default()
            )));
        }
        Err(PortError::Conflict(format!(
            "task {}: request key kept changing",
            task.task_id
        )))
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
                      #gsi2pk = :lease_pk, #gsi2sk = :lease_sk";
        let condition = format!(
            "attribute_exists(#pk) AND (#state = :queued OR (#state = :running AND {LEASE_LAPSED}))"
        );
        let values = [
            (":running".to_owned(), s(TaskState::Running.as_str())),
            (":queued".to_owned(), s(TaskState::Queued.as_str())),
            (":zero".to_owned(), n(0)),
            (":one".to_owned(), n(1)),
            (":owner".to_owned(), s(&lease.owner)),
            (":until".to_owned(), s(iso(lease.until))),
            (":now".to_owned(), s(iso(now))),
            (":lease_pk".to_owned(), s(LEASE_PK)),
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

    async fn beat(
        &self,
        task_id: &TaskId,
        lease: &Lease,
        progress: Option<&Progress>,
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
            (":lease_pk".to_owned(), s(LEASE_PK)),
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
            FinishGuard::ExpiredLease | FinishGuard::NotTerminal => {
                &[TaskState::Queued, TaskState::Running]
            }
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
            FinishGuard::Queued | FinishGuard::NotTerminal => states,
        };
        let result = serde_json::to_value(&finish.result)
            .map_err(|e| PortError::Permanent(format!("task {task_id}: result: {e}")))?;
        let update = "SET #state = :next, #result = :result, #finished_at = :now, \
                      #expires_at = :expires \
                      REMOVE #lease_owner, #lease_until, #gsi2pk, #gsi2sk";
        values.extend([
            (":next".to_owned(), s(finish.state.as_str())),
            (":result".to_owned(), json_to_attribute(&result)),
            (":now".to_owned(), s(iso(finish.at))),
            (":expires".to_owned(), expiry(finish.at, self.ttl)),
        ]);
        let request = self.update_task(task_id, update, &condition, values);
        self.guarded(
            "UpdateItem finish",
            task_id,
            request,
            "finish guard does not hold",
        )
        .await
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
            (":lease_pk".to_owned(), s(LEASE_PK)),
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
                format!("#state IN (:queued, :running) AND {LEASE_LAPSED}")
            }
        };
        let request = self.update_task(task_id, &update, &condition, values);
        self.guarded(
            "UpdateItem requeue",
            task_id,
            request,
            "requeue guard does not hold",
        )
        .await
    }

    async fn request_cancel(&self, task_id: &TaskId, _now: DateTime<Utc>) -> PortResult<Task> {
        let values = [
            (":running".to_owned(), s(TaskState::Running.as_str())),
            (":true".to_owned(), AttributeValue::Bool(true)),
        ];
        let request = self.update_task(
            task_id,
            "SET #cancel_requested = :true",
            "#state = :running",
            values,
        );
        self.guarded("UpdateItem request_cancel", task_id, request, "not running")
            .await
    }

    async fn mark_delivered(&self, task_id: &TaskId, now: DateTime<Utc>) -> PortResult<bool> {
        let request = self.update_task(
            task_id,
            "SET #delivered_at = :now",
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

    async fn append_audit(&self, item: &AuditItem) -> PortResult<()> {
        // The same event written twice (a redelivered message): one item is the point.
        self.put_if_absent("PutItem audit", audit_item(item, self.ttl)?)
            .await
    }

    async fn record_step(&self, task_id: &TaskId, step: &StepRecord) -> PortResult<()> {
        // A step stored twice (a zombie worker racing its successor) keeps the first output.
        self.put_if_absent("PutItem step", step_item(task_id, step, self.ttl))
            .await
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
        let condition = "#gsi2pk = :lease_pk AND #gsi2sk < :now";
        let query = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(GSI_BY_LEASE)
            .key_condition_expression(condition)
            .set_expression_attribute_names(Some(names_in(&[condition])))
            .expression_attribute_values(":lease_pk", s(LEASE_PK))
            .expression_attribute_values(":now", s(iso(now)))
            .scan_index_forward(true);
        // The index lags the table: check the rule again on what it returns. The sweeper's
        // conditional writes are the final word on anything that moved since.
        self.query("Query by-lease", query, Some(limit), |item| {
            let task = task_from_item(item)?;
            let live = matches!(task.state, TaskState::Queued | TaskState::Running);
            let lapsed = task.lease.as_ref().is_none_or(|l| l.until < now);
            Ok((live && lapsed).then_some(task))
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------
// KvStore
// ---------------------------------------------------------------------------------------

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

    async fn set(&self, ext: &str, user: &str, key_name: &str, value: &Value) -> PortResult<()> {
        let mut item = key(kv_pk(ext, user), key_name);
        item.insert("value".to_owned(), json_to_attribute(value));
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| port_error("PutItem store", e))?;
        Ok(())
    }

    async fn delete(&self, ext: &str, user: &str, key_name: &str) -> PortResult<()> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(kv_pk(ext, user), key_name)))
            .send()
            .await
            .map_err(|e| port_error("DeleteItem store", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_round_trips_through_attribute_values() {
        let value = json!({
            "text": "Refined output ready! 🎉",
            "n": 42, "neg": -7, "big": u64::MAX, "pi": 1.5,
            "ok": true, "none": null,
            "list": [1, "two", {"three": [3]}], "empty": {}, "empty_list": []
        });
        assert_eq!(
            attribute_to_json(&json_to_attribute(&value)).unwrap(),
            value
        );
    }

    #[test]
    fn binary_values_are_refused_not_panicked_on() {
        let blob = AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(vec![1, 2]));
        assert!(attribute_to_json(&AttributeValue::L(vec![blob])).is_err());
    }

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

    #[test]
    fn expression_names_are_collected() {
        let names = names_in(&["SET #state = :s, #gsi2pk = :p", "attribute_exists(#pk)"]);
        assert_eq!(names.len(), 3);
        assert_eq!(names["#state"], "state");
        assert_eq!(names["#gsi2pk"], "gsi2pk");
    }

    #[test]
    fn a_garbled_item_is_a_permanent_error_naming_its_key() {
        let item = key("TASK#X".to_owned(), TASK_SK);
        let err = task_from_item(&item).unwrap_err();
        assert!(
            matches!(&err, PortError::Permanent(m) if m.contains("TASK#X/TASK")),
            "{err}"
        );
    }
}
