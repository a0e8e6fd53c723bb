//! Counting AWS requests: an SDK interceptor that tallies every request a client sends by
//! operation (`DynamoDB_20120810.PutItem`, `AmazonSQS.SendMessage`, …, read from the
//! `x-amz-target` header of the JSON protocols), retries included — what AWS bills.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_dynamodb::error::BoxError;

/// The suffix of the count of items in `TransactWriteItems` requests
/// (`DynamoDB_20120810.TransactWriteItems#items`): DynamoDB bills 2 write units per item.
pub const TRANSACT_ITEMS: &str = "#items";

/// Requests by operation, shared by every client it is attached to.
#[derive(Debug, Clone, Default)]
pub struct RequestCounter {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl RequestCounter {
    /// The counts so far.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The counts since `before` (a snapshot), without zero entries.
    pub fn since(&self, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        self.snapshot()
            .into_iter()
            .map(|(op, n)| {
                let earlier = before.get(&op).copied().unwrap_or(0);
                (op, n - earlier)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// A DynamoDB client for `sdk` that counts into this counter.
    pub fn dynamodb(&self, sdk: &aws_config::SdkConfig) -> aws_sdk_dynamodb::Client {
        let config = aws_sdk_dynamodb::config::Builder::from(sdk)
            .interceptor(self.clone())
            .build();
        aws_sdk_dynamodb::Client::from_conf(config)
    }

    /// An SQS client for `sdk` that counts into this counter.
    pub fn sqs(&self, sdk: &aws_config::SdkConfig) -> aws_sdk_sqs::Client {
        let config = aws_sdk_sqs::config::Builder::from(sdk)
            .interceptor(self.clone())
            .build();
        aws_sdk_sqs::Client::from_conf(config)
    }

    /// A Secrets Manager client for `sdk` that counts into this counter.
    pub fn secrets(&self, sdk: &aws_config::SdkConfig) -> aws_sdk_secretsmanager::Client {
        let config = aws_sdk_secretsmanager::config::Builder::from(sdk)
            .interceptor(self.clone())
            .build();
        aws_sdk_secretsmanager::Client::from_conf(config)
    }
}

impl Intercept for RequestCounter {
    fn name(&self) -> &'static str {
        "RequestCounter"
    }

    fn read_before_transmit(
        &self,
        context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = context
            .request()
            .headers()
            .get("x-amz-target")
            .unwrap_or("unknown")
            .to_owned();
        // A transaction is billed by its items: count them too.
        let items = operation
            .ends_with(".TransactWriteItems")
            .then(|| context.request().body().bytes())
            .flatten()
            .and_then(|body| serde_json::from_slice::<serde_json::Value>(body).ok())
            .and_then(|body| body["TransactItems"].as_array().map(Vec::len));
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(items) = items {
            *counts
                .entry(format!("{operation}{TRANSACT_ITEMS}"))
                .or_default() += items as u64;
        }
        *counts.entry(operation).or_default() += 1;
        Ok(())
    }
}
