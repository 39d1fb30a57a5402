//! The rendezvous: a small TCP key-value store served by rank 0, where ranks announce
//! themselves and exchange what a communicator needs (e.g. NCCL's unique id).
//!
//! Every wait has a deadline; a rank that never arrives makes the others fail with a message
//! naming the missing ranks instead of hanging. The protocol is one JSON object per line.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};

use crate::env::{DistEnv, Master};
use crate::error::{LaunchError, Result};

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Set { key: String, value: Vec<u8> },
    /// All of `keys`' values once every key is set, or the keys still missing at the deadline.
    Wait { keys: Vec<String>, timeout_ms: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Done,
    Values(Vec<Vec<u8>>),
    Missing(Vec<String>),
    Error(String),
}

#[derive(Default)]
struct Shared {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Notify,
}

/// The store's server, running on its own thread until dropped.
pub struct StoreServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl StoreServer {
    /// Listens on `bind` (port 0 picks a free one).
    pub fn start(bind: SocketAddr) -> Result<StoreServer> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| LaunchError::io("starting the store's runtime", e))?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(bind))
            .map_err(|e| LaunchError::io(format!("rendezvous store: cannot listen on {bind} (is MASTER_PORT taken by another job?)"), e))?;
        let addr = listener.local_addr().map_err(|e| LaunchError::io("rendezvous store address", e))?;
        let (tx, mut rx) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let shared = Arc::new(Shared::default());
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        accepted = listener.accept() => {
                            if let Ok((socket, _)) = accepted {
                                tokio::spawn(serve(socket, shared.clone()));
                            }
                        }
                    }
                }
            });
        });
        Ok(StoreServer { addr, shutdown: Some(tx), thread: Some(thread) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve(socket: tokio::net::TcpStream, shared: Arc<Shared>) {
    let (read, mut write) = socket.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(req, &shared).await,
            Err(e) => Reply::Error(format!("bad request: {e}")),
        };
        let Ok(mut out) = serde_json::to_vec(&reply) else { return };
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
            return;
        }
    }
}

async fn handle(req: Request, shared: &Shared) -> Reply {
    match req {
        Request::Set { key, value } => {
            if let Ok(mut map) = shared.map.lock() {
                map.insert(key, value);
            }
            shared.changed.notify_waiters();
            Reply::Done
        }
        Request::Wait { keys, timeout_ms } => {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
            loop {
                // Register interest before looking, so a Set between the look and the wait
                // still wakes us.
                let notified = shared.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let missing: Vec<String> = match shared.map.lock() {
                    Ok(map) => {
                        let missing: Vec<String> = keys.iter().filter(|k| !map.contains_key(*k)).cloned().collect();
                        if missing.is_empty() {
                            return Reply::Values(keys.iter().map(|k| map[k].clone()).collect());
                        }
                        missing
                    }
                    Err(_) => return Reply::Error("store state poisoned".into()),
                };
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Reply::Missing(missing);
                }
            }
        }
    }
}

/// A blocking connection to the store.
pub struct StoreClient {
    reader: BufReader<TcpStream>,
    addr: String,
}

impl StoreClient {
    /// Connects, retrying until `timeout` (rank 0 may start after the others).
    pub fn connect(master: &Master, timeout: Duration) -> Result<StoreClient> {
        let addr = master.to_string();
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = (master.addr.as_str(), master.port).to_socket_addrs().ok().and_then(|mut a| a.next()).and_then(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(2)).ok());
            if let Some(stream) = attempt {
                let _ = stream.set_nodelay(true);
                return Ok(StoreClient { reader: BufReader::new(stream), addr });
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::Timeout(format!(
                    "could not reach the rendezvous store of rank 0 at {addr} within {:.0} s: rank 0 did not start, or MASTER_ADDR/MASTER_PORT are wrong or blocked",
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        match self.call(&Request::Set { key: key.into(), value: value.to_vec() }, None)? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    /// The values of `keys` once all are set; `Err(missing keys)` at the deadline.
    pub fn wait(&mut self, keys: &[String], timeout: Duration) -> Result<std::result::Result<Vec<Vec<u8>>, Vec<String>>> {
        let req = Request::Wait { keys: keys.to_vec(), timeout_ms: timeout.as_millis() as u64 };
        match self.call(&req, Some(timeout + Duration::from_secs(10)))? {
            Reply::Values(v) => Ok(Ok(v)),
            Reply::Missing(m) => Ok(Err(m)),
            other => Err(self.unexpected(other)),
        }
    }

    fn call(&mut self, req: &Request, timeout: Option<Duration>) -> Result<Reply> {
        let store_err = |problem: String| LaunchError::Store { addr: self.addr.clone(), problem };
        let mut line = serde_json::to_vec(req).map_err(|e| store_err(e.to_string()))?;
        line.push(b'\n');
        let stream = self.reader.get_mut();
        stream.set_read_timeout(timeout.or(Some(Duration::from_secs(60)))).map_err(|e| store_err(e.to_string()))?;
        stream.write_all(&line).map_err(|e| store_err(format!("lost the connection ({e}); did rank 0 exit?")))?;
        let mut answer = String::new();
        match self.reader.read_line(&mut answer) {
            Ok(0) => Err(store_err("rank 0 closed the connection; did it exit?".into())),
            Ok(_) => serde_json::from_str(&answer).map_err(|e| store_err(format!("bad reply: {e}"))),
            Err(e) => Err(store_err(format!("no reply ({e})"))),
        }
    }

    fn unexpected(&self, reply: Reply) -> LaunchError {
        LaunchError::Store { addr: self.addr.clone(), problem: format!("unexpected reply {reply:?}") }
    }
}

/// A joined group: the store connection (and, on rank 0, the server) stay open for later
/// exchanges such as the NCCL id.
pub struct Rendezvous {
    pub client: StoreClient,
    pub rank: usize,
    timeout: Duration,
    _server: Option<StoreServer>,
}

impl Rendezvous {
    /// Rank 0 serves the store on the master port; every rank announces itself and waits for
    /// all others until `timeout`, failing with the list of ranks that never came.
    pub fn join(env: &DistEnv, timeout: Duration) -> Result<Rendezvous> {
        let master = env.require_master()?;
        let server = if env.rank == 0 { Some(StoreServer::start(SocketAddr::from(([0, 0, 0, 0], master.port)))?) } else { None };
        let mut client = StoreClient::connect(master, timeout)?;
        client.set(&format!("arrived/{}", env.rank), hostname().as_bytes())?;
        let keys: Vec<String> = (0..env.world).map(|r| format!("arrived/{r}")).collect();
        if let Err(missing) = client.wait(&keys, timeout)? {
            let ranks: Vec<&str> = missing.iter().filter_map(|k| k.strip_prefix("arrived/")).collect();
            return Err(LaunchError::Timeout(format!(
                "rank(s) {} of {} did not join the rendezvous at {master} within {:.0} s (seen from rank {}); check that every rank was started and can reach {master} (NEUROFM_RENDEZVOUS_TIMEOUT sets the deadline)",
                ranks.join(", "),
                env.world,
                timeout.as_secs_f64(),
                env.rank
            )));
        }
        Ok(Rendezvous { client, rank: env.rank, timeout, _server: server })
    }

    /// Rank `root` publishes `value` under `key`; every rank returns it.
    pub fn share(&mut self, key: &str, root: usize, value: Option<&[u8]>) -> Result<Vec<u8>> {
        if self.rank == root {
            let v = value.ok_or_else(|| LaunchError::Config(format!("rank {root} must provide `{key}`")))?;
            self.client.set(key, v)?;
        }
        match self.client.wait(&[key.to_string()], self.timeout)? {
            Ok(mut v) => Ok(v.remove(0)),
            Err(_) => Err(LaunchError::Timeout(format!("rank {root} did not publish `{key}` within {:.0} s", self.timeout.as_secs_f64()))),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(port: u16, rank: usize, world: usize) -> DistEnv {
        DistEnv { rank, world, local_rank: rank, local_world: world, master: Some(Master { addr: "127.0.0.1".into(), port }), source: crate::env::Source::Launcher }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn ranks_meet_and_share_a_value() {
        let port = free_port();
        let handles: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || {
                    // Rank 0 starts last: the others retry until its store is up.
                    if r == 0 {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    let mut rdv = Rendezvous::join(&local(port, r, 3), Duration::from_secs(10)).unwrap();
                    let v = rdv.share("id", 0, (r == 0).then_some(&b"secret"[..])).unwrap();
                    (v, rdv) // rank 0's server lives until every rank is done
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for (v, _) in &results {
            assert_eq!(v, b"secret");
        }
    }

    #[test]
    fn a_missing_rank_is_named_within_the_deadline() {
        let port = free_port();
        let start = Instant::now();
        let e = Rendezvous::join(&local(port, 0, 3), Duration::from_millis(500)).err().unwrap().to_string();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(e.contains("rank(s) 1, 2 of 3 did not join"), "{e}");
        // Without rank 0, others fail naming the store.
        let e = Rendezvous::join(&local(port, 1, 2), Duration::from_millis(300)).err().unwrap().to_string();
        assert!(e.contains("could not reach the rendezvous store of rank 0"), "{e}");
    }
}
