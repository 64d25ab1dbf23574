//! What weir keeps in PostgreSQL, below the pipeline: sessions and their
//! errors ([`db`]), the catalog ([`catalog`]), time partitions and their
//! creation ([`partition`]), stored offsets ([`offsets`]), the dead-letter
//! table ([`deadletter`]), the retention journal ([`journal`]) and the migrations that create it all
//! ([`schema`]). Nothing here knows about Kafka or batches in flight.

pub mod catalog;
pub mod db;
pub mod deadletter;
pub mod journal;
pub mod offsets;
pub mod partition;
pub mod schema;
