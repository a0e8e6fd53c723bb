//! The task table's creation for local stacks and tools: the key schema, the `by-user` and
//! `by-lease` indexes, TTL on `expires_at` and point-in-time recovery ([`ensure_table`]).

use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, IndexStatus, KeySchemaElement, KeyType,
    PointInTimeRecoverySpecification, Projection, ProjectionType, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification,
};

use longrun::ports::{PortError, PortResult};

use super::built;
use super::keys::{
    BY_USER_ATTRIBUTES, GSI_BY_LEASE, GSI_BY_USER, GSI1_PK, GSI1_SK, GSI2_PK, GSI2_SK, PK, SK,
    TTL_ATTRIBUTE,
};
use crate::port_error;

/// How long [`ensure_table`] waits for the table to become active.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

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
    let index = |name: &str, pk: &str, sk: &str, projection: Projection| {
        built(
            "index",
            GlobalSecondaryIndex::builder()
                .index_name(name)
                .key_schema(key_element(pk, KeyType::Hash)?)
                .key_schema(key_element(sk, KeyType::Range)?)
                .projection(projection)
                .build(),
        )
    };
    let listed = Projection::builder()
        .projection_type(ProjectionType::Include)
        .set_non_key_attributes(Some(
            BY_USER_ATTRIBUTES.iter().map(|a| (*a).to_owned()).collect(),
        ))
        .build();
    let keys_only = Projection::builder()
        .projection_type(ProjectionType::KeysOnly)
        .build();
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
        .global_secondary_indexes(index(GSI_BY_USER, GSI1_PK, GSI1_SK, listed)?)
        .global_secondary_indexes(index(GSI_BY_LEASE, GSI2_PK, GSI2_SK, keys_only)?)
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
