//! The mapping between domain values and DynamoDB items: scalar encodings, JSON as native
//! `AttributeValue`s, and task records, audit items and step items to and from items.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};
use serde_json::Value;

use longrun::ActionResult;
use longrun::StepRecord;
use longrun::ports::{PortError, PortResult};
use longrun::task::{AuditItem, AuditKind, Lease, Progress, Task, TaskId, TaskKind};

use super::keys::{
    AUDIT_PREFIX, GSI1_PK, GSI1_SK, GSI2_PK, GSI2_SK, PK, SK, STEP_PREFIX, TTL_ATTRIBUTE, iso, key,
    lease_pk, lease_sk, task_key, task_pk, user_pk,
};

/// One DynamoDB item: attribute name to value.
pub(super) type Item = HashMap<String, AttributeValue>;

// ---------------------------------------------------------------------------------------
// Scalar encodings
// ---------------------------------------------------------------------------------------

/// Epoch seconds `ttl` after `at`, for the TTL attribute.
pub(super) fn expiry(at: DateTime<Utc>, ttl: Duration) -> AttributeValue {
    let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    n(at.timestamp().saturating_add(secs))
}

/// A string attribute.
pub(super) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

/// A number attribute.
pub(super) fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
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

/// The stored name of a task kind.
fn kind_name(kind: TaskKind) -> &'static str {
    match kind {
        TaskKind::Function => "function",
        TaskKind::Job => "job",
    }
}

/// A task record as an item: the record's attributes, its `by-user` keys, its `by-lease`
/// keys while it is live and leased, and its TTL once it is finished.
pub(super) fn task_item(task: &Task, ttl: Duration) -> PortResult<Item> {
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
    if task.isolated {
        put("isolated", AttributeValue::Bool(true));
    }
    put("created_at", s(iso(task.created_at)));
    for (name, at) in [
        ("wake_at", task.wake_at),
        ("started_at", task.started_at),
        ("heartbeat_at", task.heartbeat_at),
        ("finished_at", task.finished_at),
        ("delivered_at", task.delivered_at),
        ("redeliver_at", task.redeliver_at),
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
    if let Some(partial) = &task.partial {
        put("partial", json_to_attribute(partial));
    }
    if let Some(lease) = &task.lease {
        put("lease_owner", s(&lease.owner));
        put("lease_until", s(iso(lease.until)));
        // Only live tasks belong in the sweeper's index by their lease...
        if !task.state.is_terminal() {
            put(GSI2_PK, s(lease_pk(&task.task_id)));
            put(GSI2_SK, s(lease_sk(lease.until, &task.task_id)));
        }
    }
    // ... and finished ones by when their undelivered result is due again.
    if task.state.is_terminal()
        && task.delivered_at.is_none()
        && let Some(at) = task.redeliver_at
    {
        put(GSI2_PK, s(lease_pk(&task.task_id)));
        put(GSI2_SK, s(lease_sk(at, &task.task_id)));
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
pub(super) struct Fields<'a> {
    item: &'a Item,
}

impl<'a> Fields<'a> {
    /// Reads from `item`.
    pub(super) fn new(item: &'a Item) -> Self {
        Self { item }
    }

    /// A permanent error saying that attribute `name` `what` (for example "is missing"),
    /// naming the item by its key.
    pub(super) fn garbled(&self, name: &str, what: &str) -> PortError {
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

    pub(super) fn opt_s(&self, name: &str) -> PortResult<Option<&'a str>> {
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

    /// A string attribute parsed with [`FromStr`].
    pub(super) fn parsed<T: FromStr>(&self, name: &str) -> PortResult<T> {
        self.s(name)?
            .parse()
            .map_err(|_| self.garbled(name, "does not parse"))
    }

    pub(super) fn opt_n<T: FromStr>(&self, name: &str) -> PortResult<Option<T>> {
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

    pub(super) fn flag(&self, name: &str) -> PortResult<bool> {
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

    /// An attribute as JSON, if present.
    pub(super) fn json(&self, name: &str) -> PortResult<Option<Value>> {
        self.item
            .get(name)
            .map(|a| attribute_to_json(a).map_err(|what| self.garbled(name, &what)))
            .transpose()
    }
}

/// A task record read back from its item.
pub(super) fn task_from_item(item: &Item) -> PortResult<Task> {
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
        wake_at: f.opt_time("wake_at")?,
        started_at: f.opt_time("started_at")?,
        heartbeat_at: f.opt_time("heartbeat_at")?,
        finished_at: f.opt_time("finished_at")?,
        delivered_at: f.opt_time("delivered_at")?,
        redeliver_at: f.opt_time("redeliver_at")?,
        result,
        params: f.json("params")?.unwrap_or(Value::Null),
        partial: f.json("partial")?,
        lease,
        request_id: f.opt_s("request_id")?.map(str::to_owned),
        isolated: f.flag("isolated")?,
    })
}

/// An audit item: `pk = TASK#{task_id}`, `sk = AUDIT#{audit_id}`, with the event and its TTL.
pub(super) fn audit_item(audit: &AuditItem, ttl: Duration) -> PortResult<Item> {
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
pub(super) fn step_item(task_id: &TaskId, step: &StepRecord, ttl: Duration) -> Item {
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

/// A step record read back from its item.
pub(super) fn step_from_item(item: &Item) -> PortResult<StepRecord> {
    let f = Fields::new(item);
    Ok(StepRecord {
        seq: f.n("seq")?,
        name: f.s("name")?.to_owned(),
        output: f.json("output")?.unwrap_or(Value::Null),
        at: f.time("at")?,
    })
}

/// An audit item read back from its item.
pub(super) fn audit_from_item(item: &Item) -> PortResult<AuditItem> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dynamodb::keys::TASK_SK;
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
    fn a_garbled_item_is_a_permanent_error_naming_its_key() {
        let item = key("TASK#X".to_owned(), TASK_SK);
        let err = task_from_item(&item).unwrap_err();
        assert!(
            matches!(&err, PortError::Permanent(m) if m.contains("TASK#X/TASK")),
            "{err}"
        );
    }
}
