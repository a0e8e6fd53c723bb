//! The extension author's API: chat functions, named jobs and the `Extension` registry that
//! holds them, declares secrets and exports the LLM tool manifest.

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ActionResult, Ctx, Result};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
pub(crate) type Handler = Arc<dyn Fn(Ctx, Value) -> BoxFuture<Result<ActionResult>> + Send + Sync>;
type Validator = Arc<dyn Fn(&Value) -> std::result::Result<(), ParamsError> + Send + Sync>;
pub(crate) type StopHook = Arc<dyn Fn(Ctx, Stopped) -> BoxFuture<Result<()>> + Send + Sync>;

/// Why a task is stopped before its handler returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The user cancelled it.
    Cancelled,
    /// It ran past its cap.
    TimedOut,
}

/// What an `on_stop` hook is told about the task being stopped: why, its params, and what its
/// finished steps returned — a provider's job id from the step that started it, say.
#[derive(Debug, Clone)]
pub struct Stopped {
    /// Why the task stops.
    pub reason: StopReason,
    /// The task's params (or job input).
    pub params: Value,
    steps: Vec<crate::step::StepRecord>,
}

impl Stopped {
    pub(crate) fn new(
        reason: StopReason,
        params: Value,
        steps: Vec<crate::step::StepRecord>,
    ) -> Self {
        Self {
            reason,
            params,
            steps,
        }
    }

    /// The output of the last finished step named `name`, if there is one and it fits `T`.
    pub fn step<T: DeserializeOwned>(&self, name: &str) -> Option<T> {
        self.steps
            .iter()
            .rev()
            .find(|s| s.name == name)
            .and_then(|s| serde_json::from_value(s.output.clone()).ok())
    }
}

/// How long an `on_stop` hook may run before the task ends without it.
pub const STOP_HOOK_BUDGET: Duration = Duration::from_secs(10);

fn stop_hook<F, Fut>(hook: F) -> StopHook
where
    F: Fn(Ctx, Stopped) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let hook = Arc::new(hook);
    Arc::new(move |ctx: Ctx, stopped: Stopped| {
        let hook = Arc::clone(&hook);
        Box::pin(async move { hook(ctx, stopped).await })
    })
}

/// What a chat function does to the user's data, for the platform's confirmation policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionType {
    /// Only reads data; the default.
    #[default]
    Read,
    /// Creates or changes the user's data.
    Write,
    /// Deletes data or makes a change that cannot be undone; the platform may ask the user
    /// to confirm first.
    Destructive,
}

/// Params that do not fit the function's (or job's) input type. `path` names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("params{}: {message}", if path.is_empty() || path == "." { String::new() } else { format!(".{path}") })]
pub struct ParamsError {
    /// Where in the params the mismatch is, e.g. `input` or `items[0].name`; empty or `.`
    /// for the params as a whole.
    pub path: String,
    /// What is wrong there, as serde reports it.
    pub message: String,
}

fn validator<P: DeserializeOwned>() -> Validator {
    Arc::new(|value: &Value| parse::<P>(value).map(drop))
}

fn parse<P: DeserializeOwned>(value: &Value) -> std::result::Result<P, ParamsError> {
    // `null` params mean "no params": let a struct with all-default fields accept them.
    let value = if value.is_null() {
        Value::Object(Default::default())
    } else {
        value.clone()
    };
    serde_path_to_error::deserialize(value).map_err(|e| ParamsError {
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

fn handler<P, F, Fut>(run: F) -> Handler
where
    P: DeserializeOwned + Send + 'static,
    F: Fn(Ctx, P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<ActionResult>> + Send + 'static,
{
    let run = Arc::new(run);
    Arc::new(move |ctx: Ctx, value: Value| {
        let run = Arc::clone(&run);
        Box::pin(async move {
            let params = parse::<P>(&value)?;
            run(ctx, params).await
        })
    })
}

/// A function the chat's LLM can call.
///
/// ```
/// # use longrun::{ActionResult, ActionType, ChatFunction, Ctx};
/// # #[derive(serde::Deserialize, schemars::JsonSchema)] struct Params { input: String }
/// async fn refine_output(ctx: Ctx, params: Params) -> longrun::Result<ActionResult> {
///     ctx.progress(15, "Fetching context").await?;
///     Ok(ActionResult::success("Refined output ready! 🎉", serde_json::json!({"text": params.input})))
/// }
/// let function = ChatFunction::new("refine_output", refine_output)
///     .description("Refine the given text via AI completion (long-running).")
///     .action_type(ActionType::Write)
///     .event("text_refined")
///     .background(true);
/// assert!(function.is_background());
/// ```
#[derive(Clone)]
pub struct ChatFunction {
    name: String,
    description: String,
    action_type: ActionType,
    event: Option<String>,
    background: bool,
    long_running: bool,
    stall: Option<Option<Duration>>,
    on_stop: Option<StopHook>,
    params_schema: Value,
    example: Option<Value>,
    validate: Validator,
    handler: Handler,
}

impl ChatFunction {
    /// A function named `name` whose handler takes typed params `P`.
    pub fn new<P, F, Fut>(name: impl Into<String>, run: F) -> Self
    where
        P: DeserializeOwned + JsonSchema + Send + 'static,
        F: Fn(Ctx, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ActionResult>> + Send + 'static,
    {
        Self {
            name: name.into(),
            description: String::new(),
            action_type: ActionType::default(),
            event: None,
            background: false,
            long_running: false,
            stall: None,
            on_stop: None,
            params_schema: schemars::schema_for!(P).to_value(),
            example: None,
            validate: validator::<P>(),
            handler: handler(run),
        }
    }

    /// What the function does, for the LLM.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// Read, write or destructive.
    pub fn action_type(mut self, action_type: ActionType) -> Self {
        self.action_type = action_type;
        self
    }

    /// The event name the platform emits with an ok result.
    pub fn event(mut self, event: impl Into<String>) -> Self {
        self.event = Some(event.into());
        self
    }

    /// Pattern B: intake acks at once and a worker runs the whole handler.
    pub fn background(mut self, background: bool) -> Self {
        self.background = background;
        self
    }

    /// Raises the task cap from 180 s to 1800 s (background functions only).
    pub fn long_running(mut self, long_running: bool) -> Self {
        self.long_running = long_running;
        self
    }

    /// When the chat gets a "still working on it" notice: after `after` without progress
    /// while the task is alive, or never (`None`). The default is `Settings::stall_after`
    /// (60 s).
    pub fn stall_notice(mut self, after: Option<Duration>) -> Self {
        self.stall = Some(after);
        self
    }

    /// Runs `hook` when the task is cancelled or times out before the handler returned,
    /// before the task ends (within [`STOP_HOOK_BUDGET`]; past it the task ends anyway): the
    /// place to cancel work started elsewhere, such as a provider's background AI call whose
    /// id a step returned ([`Stopped::step`]). It runs in the worker — after the handler was
    /// dropped, or when a sleeping task is woken by its cancel — and may run more than once
    /// for one task (a worker that dies in it): make it idempotent. A hook error is logged.
    pub fn on_stop<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Ctx, Stopped) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        self.on_stop = Some(stop_hook(hook));
        self
    }

    /// Example params: shown in the tool manifest, played by `longrun dev`'s demo and written
    /// into the sample events. They must fit the params type ([`Extension::validated`]
    /// checks).
    pub fn example(mut self, params: Value) -> Self {
        self.example = Some(params);
        self
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the function does.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// The declared event name.
    pub fn event_name(&self) -> Option<&str> {
        self.event.as_deref()
    }

    /// The example params, if declared.
    pub fn example_params(&self) -> Option<&Value> {
        self.example.as_ref()
    }

    /// Whether intake hands the handler to a worker.
    pub fn is_background(&self) -> bool {
        self.background
    }

    /// Whether the 1800 s cap applies.
    pub fn is_long_running(&self) -> bool {
        self.long_running
    }

    /// The JSON Schema of the params.
    pub fn params_schema(&self) -> &Value {
        &self.params_schema
    }

    /// Checks params against the function's type without running it.
    pub fn validate(&self, params: &Value) -> std::result::Result<(), ParamsError> {
        (self.validate)(params)
    }

    /// Runs the handler.
    pub async fn call(&self, ctx: Ctx, params: Value) -> Result<ActionResult> {
        (self.handler)(ctx, params).await
    }
}

/// The detached part of a Pattern C handler: a named, typed piece of work a worker runs.
///
/// A Rust future cannot travel from one Lambda to another, so where the seed passes a
/// coroutine to `ctx.background_task`, longrun passes the job's name and its serializable
/// input; the worker looks the job up in the same `Extension` and runs it.
#[derive(Clone)]
pub struct Job {
    name: String,
    event: Option<String>,
    stall: Option<Option<Duration>>,
    on_stop: Option<StopHook>,
    validate: Validator,
    handler: Handler,
}

impl Job {
    /// A job named `name` whose handler takes input `I`.
    pub fn new<I, F, Fut>(name: impl Into<String>, run: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        F: Fn(Ctx, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<ActionResult>> + Send + 'static,
    {
        Self {
            name: name.into(),
            event: None,
            stall: None,
            on_stop: None,
            validate: validator::<I>(),
            handler: handler(run),
        }
    }

    /// The event name the platform emits with an ok result.
    pub fn event(mut self, event: impl Into<String>) -> Self {
        self.event = Some(event.into());
        self
    }

    /// When the chat gets a "still working on it" notice, as
    /// [`ChatFunction::stall_notice`].
    pub fn stall_notice(mut self, after: Option<Duration>) -> Self {
        self.stall = Some(after);
        self
    }

    /// Runs `hook` when the task is cancelled or times out, as [`ChatFunction::on_stop`].
    pub fn on_stop<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(Ctx, Stopped) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        self.on_stop = Some(stop_hook(hook));
        self
    }

    /// The job's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The declared event name.
    pub fn event_name(&self) -> Option<&str> {
        self.event.as_deref()
    }

    /// Checks input against the job's type without running it.
    pub fn validate(&self, input: &Value) -> std::result::Result<(), ParamsError> {
        (self.validate)(input)
    }

    /// Runs the handler.
    pub async fn call(&self, ctx: Ctx, input: Value) -> Result<ActionResult> {
        (self.handler)(ctx, input).await
    }
}

/// A secret the extension asks each user to connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretSpec {
    /// What handlers ask for: `ctx.secrets.get(name)`.
    pub name: String,
    /// What it is, for people: "OpenAI key". [`Secrets::require`](crate::Secrets::require)
    /// answers "{description} not connected" when the user has not connected it.
    pub description: String,
}

/// One entry of the LLM tool manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// The function's name.
    pub name: String,
    /// What it does, for the LLM.
    pub description: String,
    /// Read, write or destructive.
    pub action_type: ActionType,
    /// The event emitted with an ok result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Whether the chat gets an ack at once and the result later.
    pub background: bool,
    /// Whether the 1800 s cap applies.
    pub long_running: bool,
    /// JSON Schema of the params.
    pub parameters: Value,
    /// Example params.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<Value>,
}

/// Why [`Extension::validated`] refused the registrations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidExtension {
    /// Two functions, or two jobs, under one name.
    #[error("{kind} {name:?} is registered twice")]
    DuplicateName {
        /// `function` or `job`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// A function's example params do not fit its params type.
    #[error("the example params of {function:?} do not fit: {error}")]
    BadExample {
        /// The function.
        function: String,
        /// What does not fit.
        error: ParamsError,
    },
}

/// A per-user daily budget of a unit the extension counts with `ctx.charge` — AI tokens,
/// task-seconds, images, anything with a whole-number unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Budget {
    /// The meter's name, e.g. `ai_tokens`.
    pub meter: String,
    /// How many units one user may use per UTC day.
    pub per_day: u64,
    /// What the unit is, in the user's words: `AI tokens`.
    pub description: String,
}

type State = Arc<dyn Any + Send + Sync>;

/// An extension: its name, declared secrets, state, chat functions and jobs.
#[derive(Clone, Default)]
pub struct Extension {
    name: String,
    secrets: Vec<SecretSpec>,
    state: Vec<State>,
    functions: BTreeMap<String, ChatFunction>,
    jobs: BTreeMap<String, Job>,
    budgets: Vec<Budget>,
    duplicate: Option<InvalidExtension>,
}

impl Extension {
    /// An empty extension named `name` (the `ext` of every request it serves).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Declares a per-user secret (read with `ctx.secrets.get(name)`).
    pub fn secret(mut self, name: impl Into<String>, description: impl Into<String>) -> Self {
        self.secrets.push(SecretSpec {
            name: name.into(),
            description: description.into(),
        });
        self
    }

    /// Declares a per-user daily budget: each user may use `per_day` units of `meter` a UTC
    /// day, as recorded with `ctx.charge(meter, n)`; intake refuses a user's calls once they
    /// used it up (`429 over_budget`). A second budget of the same meter replaces the first.
    pub fn budget(
        mut self,
        meter: impl Into<String>,
        per_day: u64,
        description: impl Into<String>,
    ) -> Self {
        let meter = meter.into();
        self.budgets.retain(|b| b.meter != meter);
        self.budgets.push(Budget {
            meter,
            per_day,
            description: description.into(),
        });
        self
    }

    /// The declared budgets.
    pub fn budgets(&self) -> &[Budget] {
        &self.budgets
    }

    /// The budget of `meter`, if declared.
    pub fn get_budget(&self, meter: &str) -> Option<&Budget> {
        self.budgets.iter().find(|b| b.meter == meter)
    }

    /// Gives every handler `state`, reached with [`Ctx::state::<S>()`](crate::Ctx::state):
    /// clients and configuration built once, instead of clones captured by each closure. One
    /// value per type; a second of the same type replaces the first.
    pub fn with_state<S: Send + Sync + 'static>(mut self, state: S) -> Self {
        self.state.retain(|s| !s.is::<S>());
        self.state.push(Arc::new(state));
        self
    }

    /// The state of type `S`, if given.
    pub fn state_of<S: Send + Sync + 'static>(&self) -> Option<&S> {
        self.state.iter().find_map(|s| s.downcast_ref::<S>())
    }

    /// Registers a chat function.
    pub fn function(mut self, function: ChatFunction) -> Self {
        let name = function.name.clone();
        if self.functions.insert(name.clone(), function).is_some() {
            self.duplicate
                .get_or_insert(InvalidExtension::DuplicateName {
                    kind: "function",
                    name,
                });
        }
        self
    }

    /// Registers a job.
    pub fn job(mut self, job: Job) -> Self {
        let name = job.name.clone();
        if self.jobs.insert(name.clone(), job).is_some() {
            self.duplicate
                .get_or_insert(InvalidExtension::DuplicateName { kind: "job", name });
        }
        self
    }

    /// Checks the registrations (unique names, example params that fit); the runtime calls
    /// it once at start-up.
    pub fn validated(self) -> std::result::Result<Self, InvalidExtension> {
        if let Some(duplicate) = self.duplicate {
            return Err(duplicate);
        }
        for function in self.functions.values() {
            if let Some(example) = &function.example {
                function
                    .validate(example)
                    .map_err(|error| InvalidExtension::BadExample {
                        function: function.name.clone(),
                        error,
                    })?;
            }
        }
        Ok(self)
    }

    /// The extension's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The declared secrets.
    pub fn secrets(&self) -> &[SecretSpec] {
        &self.secrets
    }

    /// A chat function by name.
    pub fn get_function(&self, name: &str) -> Option<&ChatFunction> {
        self.functions.get(name)
    }

    /// A job by name.
    pub fn get_job(&self, name: &str) -> Option<&Job> {
        self.jobs.get(name)
    }

    /// The chat functions, by name.
    pub fn functions(&self) -> impl Iterator<Item = &ChatFunction> {
        self.functions.values()
    }

    /// The handler a task of `kind` named `name` runs.
    pub(crate) fn handler(&self, kind: crate::task::TaskKind, name: &str) -> Option<Handler> {
        match kind {
            crate::task::TaskKind::Function => {
                self.functions.get(name).map(|f| Arc::clone(&f.handler))
            }
            crate::task::TaskKind::Job => self.jobs.get(name).map(|j| Arc::clone(&j.handler)),
        }
    }

    /// The `on_stop` hook of a task of `kind` named `name`, if it has one.
    pub(crate) fn stop_hook(&self, kind: crate::task::TaskKind, name: &str) -> Option<StopHook> {
        match kind {
            crate::task::TaskKind::Function => {
                self.functions.get(name).and_then(|f| f.on_stop.clone())
            }
            crate::task::TaskKind::Job => self.jobs.get(name).and_then(|j| j.on_stop.clone()),
        }
    }

    /// The stall notice a task of `kind` named `name` set for itself, if it set one.
    pub(crate) fn stall_notice(
        &self,
        kind: crate::task::TaskKind,
        name: &str,
    ) -> Option<Option<Duration>> {
        match kind {
            crate::task::TaskKind::Function => self.functions.get(name).and_then(|f| f.stall),
            crate::task::TaskKind::Job => self.jobs.get(name).and_then(|j| j.stall),
        }
    }

    /// The functions as LLM tools: name, description, JSON Schema of params.
    pub fn tool_manifest(&self) -> Vec<ToolSpec> {
        self.functions
            .values()
            .map(|f| ToolSpec {
                name: f.name.clone(),
                description: f.description.clone(),
                action_type: f.action_type,
                event: f.event.clone(),
                background: f.background,
                long_running: f.long_running,
                parameters: f.params_schema.clone(),
                examples: f.example.iter().cloned().collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Deserialize, JsonSchema)]
    #[allow(dead_code)]
    struct Params {
        /// Text to refine
        input: String,
        #[serde(default)]
        max_length: Option<u32>,
    }

    async fn echo(_ctx: Ctx, params: Params) -> Result<ActionResult> {
        Ok(ActionResult::success("ok", json!({"text": params.input})))
    }

    fn ext() -> Extension {
        Extension::new("text-tools")
            .secret("openai_api_key", "OpenAI API key")
            .function(
                ChatFunction::new("refine", echo)
                    .description("Refine the given text via AI completion.")
                    .action_type(ActionType::Write)
                    .event("text_refined"),
            )
    }

    #[test]
    fn manifest_carries_name_description_and_schema() {
        let manifest = ext().tool_manifest();
        assert_eq!(manifest.len(), 1);
        let tool = &manifest[0];
        assert_eq!(tool.name, "refine");
        assert_eq!(tool.description, "Refine the given text via AI completion.");
        assert_eq!(tool.parameters["properties"]["input"]["type"], "string");
        assert_eq!(tool.parameters["required"], json!(["input"]));
    }

    #[test]
    fn validation_names_the_field() {
        let ext = ext();
        let f = ext.get_function("refine").unwrap();
        assert!(f.validate(&json!({"input": "x"})).is_ok());
        let err = f.validate(&json!({"input": 5})).unwrap_err();
        assert_eq!(err.path, "input");
        assert!(
            err.to_string().starts_with("params.input: invalid type"),
            "{err}"
        );
        let err = f.validate(&json!({})).unwrap_err();
        assert!(err.to_string().contains("missing field `input`"), "{err}");
        let err = f
            .validate(&json!({"input": "x", "max_length": -1}))
            .unwrap_err();
        assert_eq!(err.path, "max_length");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let err = ext()
            .function(ChatFunction::new("refine", echo))
            .validated()
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "function \"refine\" is registered twice");
    }

    #[test]
    fn an_example_that_does_not_fit_is_refused() {
        let err = ext()
            .function(ChatFunction::new("bad", echo).example(json!({"input": 5})))
            .validated()
            .err()
            .unwrap();
        assert!(
            err.to_string().starts_with("the example params of \"bad\""),
            "{err}"
        );
        let manifest = ext()
            .function(ChatFunction::new("good", echo).example(json!({"input": "x"})))
            .validated()
            .unwrap()
            .tool_manifest();
        assert_eq!(manifest[0].examples, vec![json!({"input": "x"})]);
    }

    #[test]
    fn state_is_found_by_type() {
        struct Model(&'static str);
        let ext = ext()
            .with_state(Model("a"))
            .with_state(7_u32)
            .with_state(Model("b"));
        assert_eq!(ext.state_of::<Model>().map(|m| m.0), Some("b"));
        assert_eq!(ext.state_of::<u32>(), Some(&7));
        assert!(ext.state_of::<String>().is_none());
    }
}
