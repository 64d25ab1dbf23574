//! TLS to PostgreSQL is verify-full when `postgres.tls_ca_file` is set.
//!
//! The test makes a CA of its own (and a second, unrelated one) with the
//! `openssl` command, a server certificate for `db.weir.test` signed by the
//! first, and runs a private PostgreSQL cluster (deploy/local/stack.sh
//! postgres-up on a port of its own) with `ssl = on` and that certificate.
//! weir connects to `db.weir.test` through `hostaddr=127.0.0.1`, so the name
//! checked against the certificate is the URL's host while the connection
//! goes to loopback. It shows:
//!
//! - with the right CA, `weir migrate` succeeds and the session is encrypted
//!   (`pg_stat_ssl`);
//! - with another CA, weir refuses the server (certificate verify failed);
//! - with the right CA but another host name in the URL, weir refuses the
//!   server (host name mismatch);
//! - with the server's TLS turned off, weir refuses to connect (no silent
//!   fall-back to plaintext), even when the URL asks for `sslmode=disable`;
//!   without a CA configured, the same server is reachable in plaintext (so
//!   the refusal is weir's invariant, not a dead server).
//!
//! Kafka TLS is not tested here: tansu 0.6.0 (the local broker) does not
//! speak TLS (see the README's Security section).
//!
//! The private cluster is stopped and deleted at the end, also when the
//! test fails (a drop guard).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::Topics;

const HOST: &str = "db.weir.test";

/// A PostgreSQL cluster of this test's own; destroyed on drop.
struct PrivateCluster {
    dir: PathBuf,
    port: u16,
}

impl PrivateCluster {
    fn start() -> PrivateCluster {
        let cluster = PrivateCluster {
            dir: std::env::temp_dir().join(common::unique("tls-pg")),
            port: common::free_port(),
        };
        cluster.stack("postgres-up");
        cluster
    }

    fn stack(&self, command: &str) -> String {
        common::private_postgres(&self.dir, self.port, command)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("pg")
    }

    /// Superuser URL over plaintext loopback (trust): for setting up.
    fn admin_url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/weir?sslmode=disable",
            self.port
        )
    }

    /// The URL weir uses: host `host` (checked against the certificate),
    /// reached at 127.0.0.1.
    fn url(&self, host: &str, extra: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/weir?hostaddr=127.0.0.1{extra}",
            self.port
        )
    }

    async fn set_ssl(&self, on: bool) {
        let admin = common::connect(&self.admin_url()).await;
        admin
            .batch_execute(&format!(
                "ALTER SYSTEM SET ssl = {}",
                if on { "on" } else { "off" }
            ))
            .await
            .expect("set ssl");
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .expect("reload");
        // The reload is asynchronous: new sessions see it once the
        // postmaster has re-read its configuration.
        common::eventually(
            "the server applies ssl",
            std::time::Duration::from_secs(20),
            || async {
                let fresh = common::connect(&self.admin_url()).await;
                let value: String = fresh
                    .query_one("SHOW ssl", &[])
                    .await
                    .expect("show ssl")
                    .get(0);
                value == if on { "on" } else { "off" }
            },
        )
        .await;
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(common::project_root().join("deploy/local/stack.sh"))
            .arg("postgres-destroy")
            .env("WEIR_STACK_DIR", &self.dir)
            .env("WEIR_STACK_PG_PORT", self.port.to_string())
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("the openssl command should run");
    assert!(
        output.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A self-signed CA: `<name>.key` and `<name>.pem` in `dir`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// `server.key` and `server.crt` for `host`, signed by the CA `ca`.
fn make_server_certificate(dir: &Path, ca: &str, host: &str) {
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            &format!("/CN={host}"),
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        format!(
            "basicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\nsubjectAltName = DNS:{host}\n"
        ),
    )
    .expect("write extensions");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

/// Puts the server's certificate and key in the cluster's data directory,
/// readable by the server's owner only (PostgreSQL refuses a key others can
/// read), and points the configuration at them.
async fn install_server_certificate(cluster: &PrivateCluster, certs: &Path) {
    let data = cluster.data_dir();
    let owner = std::fs::metadata(&data).expect("data directory");
    for name in ["server.crt", "server.key"] {
        let target = data.join(format!("weir-test-{name}"));
        std::fs::copy(certs.join(name), &target).expect("copy certificate");
        {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            std::os::unix::fs::chown(&target, Some(owner.uid()), Some(owner.gid()))
                .expect("hand the file to the server's owner");
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 0600");
        }
    }
    let admin = common::connect(&cluster.admin_url()).await;
    // One statement per call: ALTER SYSTEM refuses to run in the implicit
    // transaction of a multi-statement query.
    for (setting, file) in [
        ("ssl_cert_file", "weir-test-server.crt"),
        ("ssl_key_file", "weir-test-server.key"),
    ] {
        admin
            .batch_execute(&format!(
                "ALTER SYSTEM SET {setting} = '{}'",
                data.join(file).display()
            ))
            .await
            .expect("configure the certificate");
    }
}

/// A config file for this test (the shipped config; only PostgreSQL is used),
/// with `tls_ca_file` set when given.
fn write_config(dir: &Path, name: &str, ca: Option<&Path>) -> PathBuf {
    let topics = Topics::new("tls");
    let mut table: toml::Table =
        toml::from_str(&common::config_text("public", &topics, "tls", "")).expect("config");
    if let Some(ca) = ca {
        table["postgres"]
            .as_table_mut()
            .expect("postgres")
            .insert("tls_ca_file".into(), ca.display().to_string().into());
    }
    let path = dir.join(name);
    std::fs::write(&path, toml::to_string(&table).expect("config")).expect("write config");
    path
}

/// `weir migrate` with `config` against `url`.
fn migrate(config: &Path, url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .arg("migrate")
        .arg("--config")
        .arg(config)
        .env("WEIR_DATABASE_URL", url)
        .stdin(Stdio::null())
        .output()
        .expect("run weir migrate")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Asserts `weir migrate` failed, with one line of error that contains
/// every one of `needles` (case-insensitive); returns it.
fn assert_refused(what: &str, output: &Output, needles: &[&str]) -> String {
    let all = text(output);
    assert!(
        !output.status.success(),
        "{what}: weir migrate should fail, but it said:\n{all}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("weir:"))
        .collect();
    assert_eq!(errors.len(), 1, "{what}: one error line:\n{all}");
    let line = errors[0].to_string();
    for needle in needles {
        assert!(
            line.to_lowercase().contains(&needle.to_lowercase()),
            "{what}: the error names `{needle}`: {line}"
        );
    }
    assert!(
        !all.contains("applied "),
        "{what}: nothing was migrated:\n{all}"
    );
    println!("{what}: {line}");
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tls_is_verify_full_and_never_falls_back_to_plaintext() {
    let certs = TempDir::new("tls-certs");
    let certs = certs.0.as_path();
    make_ca(certs, "weir-test-ca");
    make_ca(certs, "other-ca");
    make_server_certificate(certs, "weir-test-ca", HOST);
    let right_ca = certs.join("weir-test-ca.pem");
    let wrong_ca = certs.join("other-ca.pem");

    let cluster = PrivateCluster::start();
    install_server_certificate(&cluster, certs).await;
    cluster.set_ssl(true).await;

    let verified = write_config(certs, "verified.toml", Some(&right_ca));
    let wrong = write_config(certs, "wrong-ca.toml", Some(&wrong_ca));
    let unverified = write_config(certs, "no-ca.toml", None);

    // The right CA and the certificate's host name: weir works, encrypted.
    let output = migrate(&verified, &cluster.url(HOST, ""));
    assert!(
        output.status.success(),
        "weir migrate with the right CA:\n{}",
        text(&output)
    );
    assert!(text(&output).contains("applied offsets table"));
    let config = weir::config::Config::load(&verified, &[]).expect("config");
    let client = weir::store::db::connect(&cluster.url(HOST, ""), &config.postgres, "tls-test")
        .await
        .expect("connect with the right CA");
    let row = client
        .query_one(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("pg_stat_ssl");
    let (encrypted, version): (bool, Option<String>) = (row.get(0), row.get(1));
    assert!(encrypted, "weir's session is encrypted");
    println!("right CA: connected over {}", version.unwrap_or_default());
    drop(client);

    // Another CA: the server's certificate does not chain to it.
    let output = migrate(&wrong, &cluster.url(HOST, ""));
    assert_refused(
        "another CA",
        &output,
        &["certificate verify failed", "postgres.tls_ca_file"],
    );

    // The right CA, but the URL names another host than the certificate.
    let output = migrate(&verified, &cluster.url("wrong.weir.test", ""));
    assert_refused(
        "another host name",
        &output,
        &["certificate verify failed", "hostname mismatch"],
    );

    // The server stops offering TLS: no fall-back to plaintext, not even
    // when the URL asks for it.
    cluster.set_ssl(false).await;
    for extra in ["", "&sslmode=prefer", "&sslmode=disable"] {
        let output = migrate(&verified, &cluster.url(HOST, extra));
        assert_refused(
            &format!("a server without TLS (URL{extra})"),
            &output,
            &["server does not support TLS", "postgres.tls_ca_file"],
        );
    }
    // Control: the server is up, and without a CA weir connects in
    // plaintext (the URL's sslmode, default prefer, decides).
    let output = migrate(&unverified, &cluster.url(HOST, ""));
    assert!(
        output.status.success(),
        "weir migrate without a CA, server without TLS:\n{}",
        text(&output)
    );

    drop(cluster);
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(common::unique(prefix));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
