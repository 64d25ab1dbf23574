//! Background partition maintenance inside `weir run`: keeps `premake`
//! partitions ready ahead of time for every table and the dead-letter table.

use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::mapping::Mappings;
use crate::partition::ManagedTable;

/// Runs maintenance every `maintenance.interval_ms` until aborted.
pub async fn run_loop(
    config: Arc<Config>,
    url: String,
    tables: Vec<Arc<ManagedTable>>,
    mappings: Arc<Mappings>,
    dead_letters: Arc<ManagedTable>,
) {
    let interval = Duration::from_millis(config.maintenance.interval_ms);
    let lock_timeout = Duration::from_millis(config.postgres.ddl_lock_timeout_ms);
    loop {
        tokio::time::sleep(interval).await;
        let mut client = match crate::db::connect(&url, &config.postgres, "maintenance").await {
            Ok(client) => client,
            Err(err) => {
                tracing::warn!(error = %err, "maintenance cannot connect; will retry");
                continue;
            }
        };
        for (table, mapping) in tables.iter().zip(&mappings.tables) {
            if let Err(err) = table.refresh(&client).await {
                tracing::warn!(table = %table.qualified(), error = %err, "cannot refresh partitions");
                continue;
            }
            match crate::pipeline::premake(&mut client, table, mapping.config.premake, lock_timeout)
                .await
            {
                Ok(created) if !created.is_empty() => {
                    tracing::info!(table = %table.qualified(), partitions = ?created, "partitions premade")
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(table = %table.qualified(), error = %err, "premake failed; will retry")
                }
            }
        }
        if let Err(err) =
            crate::pipeline::premake(&mut client, &dead_letters, 1, lock_timeout).await
        {
            tracing::warn!(error = %err, "dead-letter premake failed; will retry");
        }
    }
}
