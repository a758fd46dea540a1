//! The Redis connection of fleet mode: one multiplexed connection per process (or one cluster
//! connection), made again after any failure. Every command has `cluster.timeout`; a command
//! that fails or times out drops the connection, so the next one reconnects (and, behind
//! Sentinel, asks the sentinels for the master again: after a failover the old master answers
//! READONLY or not at all). The password is read from `password_file` at every connect.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionInfo, FromRedisValue, IntoConnectionInfo,
    RedisFuture, Value,
};

use crate::config::{Cluster, RedisTarget};

/// The store could not be asked (down, timed out, or answered an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A connection to the store (cheap to clone: one multiplexed link).
#[derive(Clone)]
pub enum Conn {
    One(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::One(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::One(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::One(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

pub struct Store {
    cfg: Cluster,
    conn: tokio::sync::Mutex<Option<Conn>>,
    /// The node pub/sub subscribes to (the master, or a cluster node: PUBLISH reaches all).
    pubsub_client: Mutex<Option<Client>>,
    up: AtomicBool,
    /// No reconnect attempt before this (a dead Redis is not hammered).
    next_attempt: Mutex<Instant>,
    up_gauge: prometheus::IntGauge,
}

const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

impl Store {
    pub fn new(cfg: Cluster, up_gauge: prometheus::IntGauge) -> Store {
        up_gauge.set(0);
        Store {
            cfg,
            conn: tokio::sync::Mutex::new(None),
            pubsub_client: Mutex::new(None),
            up: AtomicBool::new(false),
            next_attempt: Mutex::new(Instant::now()),
            up_gauge,
        }
    }

    pub fn config(&self) -> &Cluster {
        &self.cfg
    }

    /// `key_prefix` + `rest`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.cfg.key_prefix)
    }

    /// Whether the last command (or connect) succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                log::info!("cluster store reachable");
            } else {
                log::warn!("cluster store unreachable: serving with the last known state");
            }
        }
        self.up_gauge.set(i64::from(up));
    }

    /// A client for pub/sub on the node the last connect reached.
    pub fn pubsub_client(&self) -> Option<Client> {
        self.pubsub_client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn password(&self) -> Result<Option<String>, Unavailable> {
        let Some(p) = &self.cfg.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(p)
            .map_err(|e| Unavailable(format!("cannot read {}: {e}", p.display())))?;
        Ok(Some(text.trim_end_matches(['\r', '\n']).to_string()))
    }

    fn certificates(&self) -> Result<Option<redis::TlsCertificates>, Unavailable> {
        let Some(t) = &self.cfg.tls else {
            return Ok(None);
        };
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| Unavailable(format!("cannot read {}: {e}", p.display())))
        };
        let client_tls = match (&t.cert, &t.key) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                client_cert: read(c)?,
                client_key: read(k)?,
            }),
            _ => None,
        };
        let root_cert = t.ca.as_deref().map(read).transpose()?;
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }

    fn client(&self, info: ConnectionInfo) -> Result<Client, Unavailable> {
        let info = match self.password()? {
            Some(p) => {
                let r = info.redis_settings().clone().set_password(p);
                info.set_redis_settings(r)
            }
            None => info,
        };
        let made = match self.certificates()? {
            Some(certs) => Client::build_with_tls(info, certs),
            None => Client::open(info),
        };
        made.map_err(|e| Unavailable(format!("redis client: {e}")))
    }

    fn conn_config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_response_timeout(Some(self.cfg.timeout))
            .set_connection_timeout(Some(self.cfg.timeout.max(Duration::from_millis(500))))
    }

    async fn connect(&self) -> Result<Conn, Unavailable> {
        let fail = |e: redis::RedisError| Unavailable(e.to_string());
        match &self.cfg.redis {
            RedisTarget::Single { url } => {
                let info = url.as_str().into_connection_info().map_err(fail)?;
                let client = self.client(info)?;
                let c = client
                    .get_multiplexed_async_connection_with_config(&self.conn_config())
                    .await
                    .map_err(fail)?;
                self.set_pubsub(client);
                Ok(Conn::One(c))
            }
            RedisTarget::Sentinel {
                sentinels,
                master,
                db,
                tls,
            } => {
                let mut last = Unavailable("no sentinel answered".into());
                for s in sentinels {
                    match self.master_from(s, master, *tls).await {
                        Ok((host, port)) => {
                            let scheme = if *tls { "rediss" } else { "redis" };
                            let url = format!("{scheme}://{host}:{port}/{db}");
                            let info = url.as_str().into_connection_info().map_err(fail)?;
                            let client = self.client(info)?;
                            let mut c = client
                                .get_multiplexed_async_connection_with_config(&self.conn_config())
                                .await
                                .map_err(fail)?;
                            // a sentinel may still name the old master for a moment
                            let role: Vec<Value> =
                                redis::cmd("ROLE").query_async(&mut c).await.map_err(fail)?;
                            let is_master = matches!(role.first(), Some(Value::BulkString(b)) if b == b"master");
                            if !is_master {
                                last = Unavailable(format!(
                                    "{host}:{port}, named master by {s}, is not a master (yet)"
                                ));
                                continue;
                            }
                            self.set_pubsub(client);
                            return Ok(Conn::One(c));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            RedisTarget::Cluster { nodes, tls } => {
                let scheme = if *tls { "rediss" } else { "redis" };
                let urls: Vec<String> = nodes.iter().map(|n| format!("{scheme}://{n}")).collect();
                let mut b = redis::cluster::ClusterClientBuilder::new(urls.clone())
                    .connection_timeout(self.cfg.timeout.max(Duration::from_millis(500)))
                    .response_timeout(self.cfg.timeout)
                    .retries(1);
                if let Some(p) = self.password()? {
                    b = b.password(p);
                }
                if let Some(certs) = self.certificates()? {
                    b = b.certs(certs);
                }
                let client = b.build().map_err(fail)?;
                let c = client.get_async_connection().await.map_err(fail)?;
                if let Some(first) = urls.first() {
                    let info = first.as_str().into_connection_info().map_err(fail)?;
                    self.set_pubsub(self.client(info)?);
                }
                Ok(Conn::Cluster(c))
            }
        }
    }

    fn set_pubsub(&self, c: Client) {
        *self.pubsub_client.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
    }

    /// Asks one sentinel where the master is.
    async fn master_from(
        &self,
        sentinel: &str,
        master: &str,
        tls: bool,
    ) -> Result<(String, u16), Unavailable> {
        let fail = |e: redis::RedisError| Unavailable(format!("sentinel {sentinel}: {e}"));
        let scheme = if tls { "rediss" } else { "redis" };
        let info = format!("{scheme}://{sentinel}")
            .as_str()
            .into_connection_info()
            .map_err(fail)?;
        let client = match self.certificates()? {
            Some(certs) => Client::build_with_tls(info, certs),
            None => Client::open(info),
        }
        .map_err(fail)?;
        let mut c = client
            .get_multiplexed_async_connection_with_config(&self.conn_config())
            .await
            .map_err(fail)?;
        let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(master)
            .query_async(&mut c)
            .await
            .map_err(fail)?;
        addr.ok_or_else(|| {
            Unavailable(format!("sentinel {sentinel} does not know master {master}"))
        })
    }

    async fn current(&self) -> Result<Conn, Unavailable> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        {
            let mut next = self.next_attempt.lock().unwrap_or_else(|e| e.into_inner());
            if Instant::now() < *next {
                return Err(Unavailable("cluster store unreachable".into()));
            }
            *next = Instant::now() + RECONNECT_PAUSE;
        }
        let deadline = self.cfg.timeout.max(Duration::from_millis(500)) * 2;
        match tokio::time::timeout(deadline, self.connect()).await {
            Ok(Ok(c)) => {
                *slot = Some(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => {
                self.set_up(false);
                Err(e)
            }
            Err(_) => {
                self.set_up(false);
                Err(Unavailable(
                    "connecting to the cluster store timed out".into(),
                ))
            }
        }
    }

    /// Drops the connection without counting the store as down (the next call reconnects).
    pub async fn forget(&self) {
        *self.conn.lock().await = None;
        *self.next_attempt.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// A failed command: the connection is dropped unless Redis merely refused this command.
    async fn failed(&self, e: &redis::RedisError) {
        let refused_only = e.kind() == redis::ErrorKind::Parse
            || matches!(e.code(), Some(c) if c != "READONLY" && c != "LOADING" && c != "MASTERDOWN" && c != "NOAUTH" && c != "WRONGPASS" && c != "CLUSTERDOWN" && c != "TRYAGAIN");
        if !refused_only {
            *self.conn.lock().await = None;
            self.set_up(false);
        }
    }

    /// Runs `f` on the connection within the command timeout.
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.current().await?;
        self.command(f(conn), true).await
    }

    /// Like [`Store::run`], but never waits for a connection to be made (or for another
    /// caller making one): for the request path (`sync = "0s"`), which waits at most the
    /// command timeout.
    pub async fn run_ready<T, F, Fut>(&self, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = match self.conn.try_lock() {
            Ok(slot) => slot.clone(),
            Err(_) => None,
        }
        .ok_or_else(|| Unavailable("no connection to the cluster store".into()))?;
        self.command(f(conn), false).await
    }

    /// A command's outcome within the timeout. A command that timed out drops the connection
    /// and counts the store as down, unless it ran on the request path (`background: false`),
    /// which leaves that to the background tasks rather than wait for the connection's lock.
    async fn command<T>(
        &self,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
        background: bool,
    ) -> Result<T, Unavailable> {
        match tokio::time::timeout(self.cfg.timeout, fut).await {
            Ok(Ok(v)) => {
                if background {
                    self.set_up(true);
                }
                Ok(v)
            }
            Ok(Err(e)) => {
                self.failed(&e).await;
                Err(Unavailable(e.to_string()))
            }
            Err(_) => {
                if background {
                    *self.conn.lock().await = None;
                    self.set_up(false);
                }
                Err(Unavailable("cluster store command timed out".into()))
            }
        }
    }

    /// One command.
    pub async fn query<T: FromRedisValue + Send>(&self, cmd: Cmd) -> Result<T, Unavailable> {
        self.run(|mut c| async move { cmd.query_async(&mut c).await })
            .await
    }
}
