//! PostgreSQL sessions and the classification of their errors.
//!
//! Errors are classified by SQLSTATE (and by whether the connection is
//! gone), never by message text. The class decides what weir does: retry the
//! same batch, isolate bad rows, or stop the lane and say what is wrong.

use std::time::Duration;

use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::X509;
use openssl::x509::store::X509StoreBuilder;
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Error};

use crate::config::{ConfigError, PostgresConfig};
use crate::store::catalog::quote_ident;

/// What a PostgreSQL error means for the batch that met it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The database or the link to it is having trouble (connection lost,
    /// shutdown, serialization failure, deadlock, lock timeout, out of
    /// resources). Retry the same batch, in order, after a backoff. Never a
    /// dead letter.
    Transient,
    /// A row is bad (SQLSTATE classes 22 and 23, and kin): isolate it, make
    /// it a dead letter, write the rest.
    Row,
    /// The table or the permissions are not what the mapping expects
    /// (undefined table or column, permission denied...). Stop the lane,
    /// report not ready, keep offsets where they are, and retry slowly until
    /// the schema is fixed.
    Schema,
}

/// Classifies a PostgreSQL error.
pub fn classify(err: &Error) -> ErrorClass {
    if err.is_closed() {
        return ErrorClass::Transient;
    }
    let Some(code) = err.code() else {
        // I/O, TLS or protocol trouble: the connection is suspect.
        return ErrorClass::Transient;
    };
    classify_sqlstate(code.code())
}

/// Classifies a SQLSTATE.
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    let class = &code[..code.len().min(2)];
    match code {
        // Admin or crash shutdown, cannot connect now.
        "57P01" | "57P02" | "57P03" => return ErrorClass::Transient,
        // statement_timeout / cancel: retry (with backoff) rather than drop.
        "57014" => return ErrorClass::Transient,
        // Serialization failure, deadlock, lock timeout.
        "40001" | "40P01" | "55P03" => return ErrorClass::Transient,
        // Undefined table / column / object, permission denied, wrong type.
        "42P01" | "42703" | "42704" | "42501" | "42804" | "42809" => return ErrorClass::Schema,
        // Row too big for an index and similar limits hit by one row.
        "54000" => return ErrorClass::Row,
        _ => {}
    }
    match class {
        // Connection exception, insufficient resources, system error,
        // transaction state, internal error, transaction rollback.
        "08" | "53" | "58" | "XX" | "25" | "40" => ErrorClass::Transient,
        // Data exception, integrity violation, WITH CHECK OPTION, a trigger
        // raising for this row.
        "22" | "23" | "44" | "P0" => ErrorClass::Row,
        // Everything else (syntax or access rule, feature not supported,
        // invalid authorization...) is configuration or schema: stop and say so.
        _ => ErrorClass::Schema,
    }
}

/// The SQLSTATE of an error, or `connection` when there is none.
pub fn sqlstate(err: &Error) -> String {
    err.code()
        .map(|code| code.code().to_string())
        .unwrap_or_else(|| "connection".to_string())
}

/// A one-line description of a PostgreSQL error with its SQLSTATE, table,
/// column and constraint when the server gave them.
pub fn describe(err: &Error) -> String {
    match err.as_db_error() {
        Some(db) => {
            let mut text = format!("{} ({})", db.message(), db.code().code());
            if let Some(table) = db.table() {
                text += &format!(", table {table}");
            }
            if let Some(column) = db.column() {
                text += &format!(", column {column}");
            }
            if let Some(constraint) = db.constraint() {
                text += &format!(", constraint {constraint}");
            }
            if let Some(detail) = db.detail() {
                text += &format!(": {detail}");
            }
            text
        }
        // tokio-postgres' own text names only the kind ("error performing
        // TLS handshake", "error connecting to server"); the why (OpenSSL's
        // verify result, the OS error) is in the source chain.
        None => {
            let mut text = err.to_string();
            let mut source = std::error::Error::source(err);
            while let Some(cause) = source {
                // OpenSSL's errors repeat their own text down the chain.
                let cause_text = cause.to_string();
                if !text.contains(&cause_text) {
                    text += &format!(": {cause_text}");
                }
                source = cause.source();
            }
            text
        }
    }
}

/// True for `unique_violation` and friends that a dedupe path absorbs.
pub fn is_unique_violation(err: &Error) -> bool {
    err.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// Opens a session for `role` (shown in `application_name`), set up the way
/// weir relies on: UTC, ISO dates, the configured schema first in the
/// search path, the statement timeout.
pub async fn connect(
    url: &str,
    config: &PostgresConfig,
    role: &str,
) -> Result<Client, ConnectError> {
    let mut pg: tokio_postgres::Config = url.parse().map_err(|err: Error| {
        ConnectError::Config(ConfigError::new(
            crate::config::DATABASE_URL_ENV,
            err.to_string(),
        ))
    })?;
    pg.application_name(format!("{}-{role}", config.application_name));
    pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
    // Notice a dead server (or a cut network) in about a minute, not hours.
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(30));
    pg.keepalives_interval(Duration::from_secs(10));
    pg.keepalives_retries(3);
    if config.tls_ca_file.is_some() {
        // verify-full means TLS or nothing: without this, tokio-postgres'
        // default (`prefer`) would fall back to plaintext when the server
        // offers no TLS, and a URL's `sslmode=disable` would skip TLS
        // altogether. See `tls_connector`.
        pg.ssl_mode(SslMode::Require);
    }
    let tls = tls_connector(config).map_err(ConnectError::Config)?;
    let (client, connection) = pg.connect(tls).await.map_err(|err| {
        match &config.tls_ca_file {
            // Say which setting refused the server: OpenSSL's text alone
            // ("certificate verify failed", "server does not support TLS")
            // does not tell an operator where to look. Matched on the text
            // only to word the message; the error is not classified by it.
            Some(ca) if err.as_db_error().is_none() && err.to_string().contains("TLS") => {
                ConnectError::Tls {
                    ca: ca.clone(),
                    hosts: hosts(&pg),
                    error: err,
                }
            }
            _ => ConnectError::Db(err),
        }
    })?;
    let role_name = role.to_string();
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(role = %role_name, error = %err, "postgres connection ended");
        }
    });
    client
        .batch_execute(&format!(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET search_path = {}, public; \
             SET statement_timeout = {}; SET idle_in_transaction_session_timeout = {}; \
             SET client_min_messages = warning;",
            quote_ident(&config.schema),
            config.statement_timeout_ms,
            config.idle_in_transaction_timeout_ms
        ))
        .await
        .map_err(ConnectError::Db)?;
    Ok(client)
}

/// TLS for weir's sessions.
///
/// Invariant: with `postgres.tls_ca_file` set, every session is encrypted
/// and verified as libpq's `sslmode=verify-full` would: the server's
/// certificate must chain to that CA file alone (not to the system's trust
/// store) and must name the host weir connected to (`host` of the URL, also
/// when `hostaddr` is given). A server that offers no TLS is refused, never
/// used in plaintext: [`connect`] raises the URL's `sslmode` to `require`.
fn tls_connector(config: &PostgresConfig) -> Result<MakeTlsConnector, ConfigError> {
    let ca = config
        .tls_ca_file
        .as_deref()
        .map(|path| Ok::<_, ConfigError>((path, read_ca_file(path)?)))
        .transpose()?;
    let mut connector = MakeTlsConnector::new(ssl_connector(ca)?);
    if config.tls_ca_file.is_none() {
        connector.set_callback(|connect, _| {
            connect.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok(connector)
}

fn read_ca_file(path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|err| {
        ConfigError::new(
            "postgres.tls_ca_file",
            format!("{path}: cannot read: {err}"),
        )
    })
}

/// The OpenSSL connector for a CA file's bytes (`None`: no CA file).
///
/// Building one costs about 80 ms of CPU, most of it OpenSSL decoding every
/// certificate of the system's trust store (which `SslConnector::builder`
/// loads, even where weir then replaces it or does not verify). weir opens
/// sessions at start, on every reconnect and for maintenance, so the last
/// connector built is kept and reused while the CA file holds the same
/// bytes. The file is read at every connect: a rotated CA is trusted from
/// the next session on.
fn ssl_connector(ca: Option<(&str, Vec<u8>)>) -> Result<SslConnector, ConfigError> {
    static LAST: std::sync::Mutex<Option<(Option<Vec<u8>>, SslConnector)>> =
        std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((built_for, connector)) = last.as_ref()
        && built_for.as_deref() == ca.as_ref().map(|(_, pem)| &pem[..])
    {
        return Ok(connector.clone());
    }
    let connector = build_ssl_connector(ca.as_ref().map(|(path, pem)| (*path, &pem[..])))?;
    *last = Some((ca.map(|(_, pem)| pem), connector.clone()));
    Ok(connector)
}

/// A connector trusting only the CA certificates in `pem` (read from
/// `path`), or, without a CA, one that encrypts without verifying.
fn build_ssl_connector(ca: Option<(&str, &[u8])>) -> Result<SslConnector, ConfigError> {
    let field = "postgres.tls_ca_file";
    let mut builder = SslConnector::builder(SslMethod::tls())
        .map_err(|err| ConfigError::new(field, err.to_string()))?;
    match ca {
        Some((path, pem)) => {
            let certificates = X509::stack_from_pem(pem).map_err(|err| {
                ConfigError::new(field, format!("{path}: not PEM certificates: {err}"))
            })?;
            if certificates.is_empty() {
                return Err(ConfigError::new(
                    field,
                    format!("{path}: holds no PEM certificate"),
                ));
            }
            // A store of this CA only: SslConnector's default store also
            // trusts the system's CAs, which verify-full must not.
            let mut store =
                X509StoreBuilder::new().map_err(|err| ConfigError::new(field, err.to_string()))?;
            for certificate in certificates {
                store
                    .add_cert(certificate)
                    .map_err(|err| ConfigError::new(field, format!("{path}: {err}")))?;
            }
            builder.set_cert_store(store.build());
            // Host name checking is on by default in postgres-openssl's
            // connector (openssl's ConnectConfiguration::verify_hostname).
            builder.set_verify(SslVerifyMode::PEER);
        }
        None => {
            // As libpq's sslmode=prefer (tokio-postgres' default) or require
            // (when the URL says so): encrypted when the server offers it,
            // certificate not verified.
            builder.set_verify(SslVerifyMode::NONE);
        }
    }
    Ok(builder.build())
}

/// The host names of a connection config (what the server's certificate
/// must name), for messages.
fn hosts(pg: &tokio_postgres::Config) -> String {
    pg.get_hosts()
        .iter()
        .map(|host| match host {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Config(ConfigError),
    #[error("cannot connect to PostgreSQL: {}", describe(.0))]
    Db(Error),
    /// The TLS handshake required by `postgres.tls_ca_file` failed: the
    /// server offers no TLS, or its certificate does not chain to the CA or
    /// does not name the host.
    #[error(
        "cannot connect to PostgreSQL over verified TLS (postgres.tls_ca_file = {ca}; the \
         server must offer TLS with a certificate signed by that CA for host {hosts}): {}",
        describe(error)
    )]
    Tls {
        ca: String,
        hosts: String,
        error: Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_connector_is_built_again_only_when_the_ca_file_changes() {
        let pem = |cn: &str| {
            let key =
                openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
            let mut name = openssl::x509::X509NameBuilder::new().unwrap();
            name.append_entry_by_text("CN", cn).unwrap();
            let name = name.build();
            let mut cert = X509::builder().unwrap();
            cert.set_subject_name(&name).unwrap();
            cert.set_issuer_name(&name).unwrap();
            cert.set_pubkey(&key).unwrap();
            cert.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
                .unwrap();
            cert.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap())
                .unwrap();
            cert.sign(&key, openssl::hash::MessageDigest::sha256())
                .unwrap();
            cert.build().to_pem().unwrap()
        };
        // The subjects a connector trusts.
        let trusted = |connector: &SslConnector| -> Vec<String> {
            connector
                .context()
                .cert_store()
                .all_certificates()
                .iter()
                .map(|c| format!("{:?}", c.subject_name()))
                .collect()
        };
        let same = |a: &SslConnector, b: &SslConnector| std::ptr::eq(a.context(), b.context());
        let (first_pem, second_pem) = (pem("first-ca"), pem("second-ca"));

        let first = ssl_connector(Some(("ca.pem", first_pem.clone()))).unwrap();
        assert_eq!(trusted(&first).len(), 1);
        assert!(trusted(&first)[0].contains("first-ca"));
        let again = ssl_connector(Some(("ca.pem", first_pem.clone()))).unwrap();
        assert!(
            same(&first, &again),
            "the same CA bytes reuse the connector"
        );

        let rotated = ssl_connector(Some(("ca.pem", second_pem))).unwrap();
        assert!(!same(&first, &rotated));
        assert!(
            trusted(&rotated)[0].contains("second-ca"),
            "a rotated CA is trusted"
        );

        let plain = ssl_connector(None).unwrap();
        assert!(
            !same(&rotated, &plain),
            "no CA file: a connector of its own"
        );
        assert!(same(&plain, &ssl_connector(None).unwrap()));

        let Err(err) = ssl_connector(Some(("ca.pem", b"not a certificate".to_vec()))) else {
            panic!("bad PEM is refused");
        };
        assert!(
            err.to_string().contains("holds no PEM certificate"),
            "{err}"
        );
        // A refused CA replaces nothing: the last good one is still reused.
        assert!(same(&plain, &ssl_connector(None).unwrap()));
    }

    #[test]
    fn sqlstates_are_classified_by_class_and_code() {
        for transient in [
            "08006", "08001", "57P01", "57P03", "40001", "40P01", "53100", "53300", "55P03",
            "57014", "XX000",
        ] {
            assert_eq!(
                classify_sqlstate(transient),
                ErrorClass::Transient,
                "{transient}"
            );
        }
        for row in [
            "22001", "22P02", "22P05", "22021", "23505", "23502", "23514", "54000", "P0001",
        ] {
            assert_eq!(classify_sqlstate(row), ErrorClass::Row, "{row}");
        }
        for schema in [
            "42P01", "42703", "42501", "42804", "42601", "0A000", "28P01",
        ] {
            assert_eq!(classify_sqlstate(schema), ErrorClass::Schema, "{schema}");
        }
    }
}
