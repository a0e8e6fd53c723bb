//! [`UsageStore`] (`ctx.charge`) on the task table: one item per `(ext, user, day, meter)`,
//! under `pk = USAGE#{ext}#{user}` and `sk = {day}#{meter}`, with the day's total `used` and
//! the set of charge ids counted (`charges`), so a retried charge counts once. Items expire
//! two days after their day.

use std::collections::BTreeMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use chrono::{NaiveDate, TimeZone, Utc};

use longrun::ports::{PortResult, UsageStore};

use super::item::{Fields, n, s};
use super::keys::{PK, SK, TTL_ATTRIBUTE, key, usage_pk};
use crate::port_error;

/// Budget meters in the task table.
#[derive(Debug, Clone)]
pub struct DynamoUsage {
    client: Client,
    table: String,
}

impl DynamoUsage {
    /// Meters in `table`.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }
}

/// A meter's sort key on `day`.
fn usage_sk(day: NaiveDate, meter: &str) -> String {
    format!("{day}#{meter}")
}

/// Epoch seconds two days after `day` began: the item's TTL.
fn expires(day: NaiveDate) -> AttributeValue {
    let start = Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).unwrap_or_default());
    n((start + chrono::Duration::days(2)).timestamp())
}

fn used_of(item: &std::collections::HashMap<String, AttributeValue>) -> PortResult<u64> {
    Ok(Fields::new(item).opt_n("used")?.unwrap_or(0))
}

#[async_trait]
impl UsageStore for DynamoUsage {
    async fn charge(
        &self,
        ext: &str,
        user: &str,
        meter: &str,
        day: NaiveDate,
        charge_id: &str,
        amount: u64,
    ) -> PortResult<u64> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(usage_pk(ext, user), usage_sk(day, meter))))
            .update_expression(
                "SET #used = if_not_exists(#used, :zero) + :amount, #meter = :meter, \
                 #day = :day, #ttl = :ttl ADD #charges :ids",
            )
            .condition_expression("attribute_not_exists(#charges) OR NOT contains(#charges, :id)")
            .expression_attribute_names("#used", "used")
            .expression_attribute_names("#meter", "meter")
            .expression_attribute_names("#day", "day")
            .expression_attribute_names("#ttl", TTL_ATTRIBUTE)
            .expression_attribute_names("#charges", "charges")
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":amount", n(amount))
            .expression_attribute_values(":meter", s(meter))
            .expression_attribute_values(":day", s(day.to_string()))
            .expression_attribute_values(":ttl", expires(day))
            .expression_attribute_values(":ids", AttributeValue::Ss(vec![charge_id.to_owned()]))
            .expression_attribute_values(":id", s(charge_id))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match out {
            Ok(out) => used_of(&out.attributes.unwrap_or_default()),
            Err(err) => {
                // Counted already: the total as it stands.
                if let Some(UpdateItemError::ConditionalCheckFailedException(failed)) =
                    err.as_service_error()
                    && let Some(item) = &failed.item
                {
                    return used_of(item);
                }
                Err(port_error("UpdateItem charge", err))
            }
        }
    }

    async fn usage(
        &self,
        ext: &str,
        user: &str,
        day: NaiveDate,
    ) -> PortResult<BTreeMap<String, u64>> {
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("#pk = :pk AND begins_with(#sk, :day)")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#sk", SK)
            .expression_attribute_values(":pk", s(usage_pk(ext, user)))
            .expression_attribute_values(":day", s(format!("{day}#")))
            .projection_expression("#meter, #used")
            .expression_attribute_names("#meter", "meter")
            .expression_attribute_names("#used", "used")
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| port_error("Query usage", e))?;
        let mut totals = BTreeMap::new();
        for item in out.items() {
            let f = Fields::new(item);
            let meter = f.opt_s("meter")?.unwrap_or_default().to_owned();
            totals.insert(meter, used_of(item)?);
        }
        Ok(totals)
    }

    async fn reset(
        &self,
        ext: &str,
        user: &str,
        day: NaiveDate,
        meter: Option<&str>,
    ) -> PortResult<()> {
        let meters: Vec<String> = match meter {
            Some(meter) => vec![meter.to_owned()],
            None => self.usage(ext, user, day).await?.into_keys().collect(),
        };
        for meter in meters {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key(usage_pk(ext, user), usage_sk(day, &meter))))
                .send()
                .await
                .map_err(|e| port_error("DeleteItem usage", e))?;
        }
        Ok(())
    }
}
