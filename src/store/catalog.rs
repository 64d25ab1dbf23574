//! What PostgreSQL's catalog says about the tables weir writes: columns,
//! their types (resolved through domains, enums and arrays), nullability,
//! and how the table is partitioned.
//!
//! Column types are never configured: they are read here, and the mapping is
//! checked against them at start (`mapping::compile`).

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::copy::PgType;

/// A table, as the catalog describes it.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    pub columns: Vec<ColumnInfo>,
    /// `Some` when the table is `PARTITION BY RANGE` on exactly one column.
    pub range_key: Option<String>,
    /// How the table is partitioned, for messages (`range`, `list`, `hash`,
    /// or `none`).
    pub partitioning: &'static str,
    /// Column sets of the table's non-partial unique indexes.
    pub unique_keys: Vec<Vec<String>>,
}

impl TableInfo {
    /// `"schema"."name"`, ready for SQL.
    pub fn qualified(&self) -> String {
        qualify(&self.schema, &self.name)
    }

    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.name == name)
    }
}

#[derive(Debug, Clone)]
pub struct ColumnInfo {
    pub name: String,
    /// The encodable type, or the name of a type weir cannot write.
    pub ty: Result<PgType, String>,
    pub not_null: bool,
    pub has_default: bool,
    pub generated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("table `{0}` does not exist (run `weir migrate` for the bundled schema, or create it)")]
    NotFound(String),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// Quotes an identifier for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"schema"."name"`.
pub fn qualify(schema: &str, name: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

/// Splits a configured `name` or `schema.name`, using `default_schema` for a
/// bare name.
pub fn split_name<'a>(name: &'a str, default_schema: &'a str) -> (&'a str, &'a str) {
    match name.split_once('.') {
        Some((schema, table)) => (schema, table),
        None => (default_schema, name),
    }
}

/// Reads a table's definition.
pub async fn load_table(
    client: &Client,
    name: &str,
    default_schema: &str,
) -> Result<TableInfo, CatalogError> {
    let (schema, table) = split_name(name, default_schema);
    let row = client
        .query_opt(
            "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text,
                    pt.partstrat::text, pt.partnatts::int4,
                    (SELECT a.attname::text FROM pg_attribute a
                      WHERE a.attrelid = c.oid AND a.attnum = pt.partattrs[0])
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_partitioned_table pt ON pt.partrelid = c.oid
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &table],
        )
        .await?
        .ok_or_else(|| CatalogError::NotFound(format!("{schema}.{table}")))?;
    let oid: u32 = row.get(0);
    let strategy: Option<String> = row.get(4);
    let key_columns: Option<i32> = row.get(5);
    let key_name: Option<String> = row.get(6);
    let partitioning = match strategy.as_deref() {
        Some("r") => "range",
        Some("l") => "list",
        Some("h") => "hash",
        _ => "none",
    };
    let range_key = match (partitioning, key_columns, key_name) {
        ("range", Some(1), Some(name)) => Some(name),
        _ => None,
    };

    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, a.attnotnull, a.atthasdef,
                    a.attgenerated::text
               FROM pg_attribute a
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&oid],
        )
        .await?;
    let mut resolver = TypeResolver::default();
    let mut columns = Vec::with_capacity(rows.len());
    for row in rows {
        let type_oid: u32 = row.get(1);
        let typmod: i32 = row.get(2);
        let generated: String = row.get(5);
        columns.push(ColumnInfo {
            name: row.get(0),
            ty: resolver.resolve(client, type_oid, typmod).await?,
            not_null: row.get(3),
            has_default: row.get(4),
            generated: !generated.is_empty(),
        });
    }
    let unique_keys = client
        .query(
            "SELECT array_agg(a.attname::text ORDER BY k.ord)
               FROM pg_index i
              CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL
              GROUP BY i.indexrelid",
            &[&oid],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Ok(TableInfo {
        oid,
        schema: row.get(1),
        name: row.get(2),
        columns,
        range_key,
        partitioning,
        unique_keys,
    })
}

#[derive(Default)]
struct TypeResolver {
    enums: HashMap<u32, Vec<String>>,
}

impl TypeResolver {
    /// Maps a type OID to an encodable type; domains resolve to their base
    /// type (their constraints are checked by the server), arrays to their
    /// element type.
    async fn resolve(
        &mut self,
        client: &Client,
        oid: u32,
        typmod: i32,
    ) -> Result<Result<PgType, String>, tokio_postgres::Error> {
        let mut oid = oid;
        let mut typmod = typmod;
        for _ in 0..8 {
            let row = client
                .query_one(
                    "SELECT t.typname::text, t.typtype::text, t.typelem, t.typbasetype,
                            t.typtypmod, t.typcategory::text
                       FROM pg_type t WHERE t.oid = $1",
                    &[&oid],
                )
                .await?;
            let name: String = row.get(0);
            let kind: String = row.get(1);
            let element: u32 = row.get(2);
            let base: u32 = row.get(3);
            let category: String = row.get(5);
            if kind == "d" {
                oid = base;
                let domain_typmod: i32 = row.get(4);
                if typmod < 0 {
                    typmod = domain_typmod;
                }
                continue;
            }
            if kind == "e" {
                return Ok(Ok(PgType::Enum {
                    labels: self.enum_labels(client, oid).await?,
                }));
            }
            if category == "A" && element != 0 {
                let inner = Box::pin(self.resolve(client, element, -1)).await?;
                return Ok(match inner {
                    Ok(PgType::Array { .. }) => Err(format!("{name} (nested arrays)")),
                    Ok(ty) => Ok(PgType::Array {
                        element: Box::new(ty),
                        element_oid: element,
                    }),
                    Err(inner) => Err(format!("{name} (arrays of {inner})")),
                });
            }
            let max_chars = (typmod >= 4).then(|| (typmod - 4) as usize);
            return Ok(match name.as_str() {
                "bool" => Ok(PgType::Bool),
                "int2" => Ok(PgType::Int2),
                "int4" => Ok(PgType::Int4),
                "int8" => Ok(PgType::Int8),
                "float4" => Ok(PgType::Float4),
                "float8" => Ok(PgType::Float8),
                "numeric" => Ok(PgType::Numeric),
                "text" | "citext" | "name" => Ok(PgType::Text),
                "varchar" | "bpchar" => Ok(PgType::BoundedText { max_chars }),
                "uuid" => Ok(PgType::Uuid),
                "json" => Ok(PgType::Json),
                "jsonb" => Ok(PgType::Jsonb),
                "timestamptz" => Ok(PgType::Timestamptz),
                "timestamp" => Ok(PgType::Timestamp),
                "date" => Ok(PgType::Date),
                "bytea" => Ok(PgType::Bytea),
                _ => Err(name),
            });
        }
        Ok(Err(format!("type {oid} (domain chain too deep)")))
    }

    async fn enum_labels(
        &mut self,
        client: &Client,
        oid: u32,
    ) -> Result<Vec<String>, tokio_postgres::Error> {
        if let Some(labels) = self.enums.get(&oid) {
            return Ok(labels.clone());
        }
        let labels: Vec<String> = client
            .query(
                "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1 ORDER BY enumsortorder",
                &[&oid],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        self.enums.insert(oid, labels.clone());
        Ok(labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("wa_events"), "\"wa_events\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(qualify("public", "t"), "\"public\".\"t\"");
        assert_eq!(split_name("a.b", "public"), ("a", "b"));
        assert_eq!(split_name("b", "public"), ("public", "b"));
    }
}
