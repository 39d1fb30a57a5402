//! The rendezvous: a small TCP key-value store served by rank 0, where ranks announce
//! themselves and exchange what a communicator needs (e.g. NCCL's unique id).
//!
//! Every wait has a deadline; a rank that never arrives makes the others fail with a message
//! naming the missing ranks instead of hanging. The protocol is one JSON object per line.
//!
//! The store listens on the network while other users' processes may run on the same nodes, so
//! it admits only clients that present the job's secret token (`NEUROFM_RENDEZVOUS_TOKEN`) in
//! their first line, and bounds what any client can make it hold: lines, keys and values.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{oneshot, Notify};

use crate::env::{DistEnv, Master};
use crate::error::{LaunchError, Result};

/// The environment variable that carries the job's token to every rank.
pub const TOKEN_VAR: &str = "NEUROFM_RENDEZVOUS_TOKEN";

/// Longest request or reply line (bytes, without the newline). A longer line ends the
/// connection, so a client cannot grow rank 0's memory by never sending a newline.
pub const MAX_LINE: usize = 64 * 1024;
/// Longest first line: before a client has shown the token it gets less room.
const MAX_HELLO_LINE: usize = 1024;
/// How long a client has to present the token after connecting.
const HELLO_DEADLINE: Duration = Duration::from_secs(10);
/// Most distinct keys the store holds: above the largest world size we expect, so that a
/// runaway client cannot fill memory.
pub const MAX_KEYS: usize = 16384;
pub const MAX_KEY_LEN: usize = 256;
/// Largest value (bytes); NCCL's unique id, the largest we exchange, is 128.
pub const MAX_VALUE_LEN: usize = 4096;
/// Ranks waited for per request when joining, so that a request and its reply stay far below
/// `MAX_LINE` at any world size.
const JOIN_CHUNK: usize = 128;

/// The job's shared secret, shown by every client before the store serves it. Made with OS
/// randomness by `neurofm-launch` or the slurm/ scripts; never printed (`Debug` hides it).
#[derive(Clone, PartialEq, Eq)]
pub struct RendezvousToken(String);

impl std::fmt::Debug for RendezvousToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RendezvousToken(hidden)")
    }
}

/// Why a token is missing, and how to set one (the message of every refusal).
fn token_help(problem: &str) -> LaunchError {
    LaunchError::Config(format!(
        "{TOKEN_VAR} {problem}: rank 0's rendezvous store admits only ranks that present the job's secret token. \
         neurofm-launch (one node) and the slurm/ scripts set it; otherwise export the same random value to every rank before starting them, \
         e.g. `export {TOKEN_VAR}=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \\n')` before srun, or `mpirun -x {TOKEN_VAR}`"
    ))
}

impl RendezvousToken {
    /// 128 random bits from the OS, as 32 hex digits.
    pub fn generate() -> Result<RendezvousToken> {
        let mut bytes = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(|e| LaunchError::io("reading /dev/urandom for the rendezvous token", e))?;
        Ok(RendezvousToken(bytes.iter().map(|b| format!("{b:02x}")).collect()))
    }

    /// A token given by the user: at least 16 printable characters without spaces, so that an
    /// empty or placeholder value is caught rather than trusted.
    pub fn new(value: &str) -> Result<RendezvousToken> {
        if value.is_empty() {
            return Err(token_help("is empty"));
        }
        if value.len() < 16 || value.len() > 256 || !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(token_help("must be 16 to 256 printable characters without spaces (it is not shown here)"));
        }
        Ok(RendezvousToken(value.to_string()))
    }

    /// The token of this process's job, from `NEUROFM_RENDEZVOUS_TOKEN`; refuses when unset
    /// instead of letting anyone in.
    pub fn from_env() -> Result<RendezvousToken> {
        RendezvousToken::from_var(std::env::var(TOKEN_VAR))
    }

    fn from_var(var: std::result::Result<String, std::env::VarError>) -> Result<RendezvousToken> {
        match var {
            Ok(v) => RendezvousToken::new(&v),
            Err(std::env::VarError::NotPresent) => Err(token_help("is not set")),
            Err(std::env::VarError::NotUnicode(_)) => Err(token_help("is not valid UTF-8")),
        }
    }

    /// The secret itself, to pass to child processes through their environment (never on a
    /// command line: other users can read those).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares in constant time: every byte is looked at whatever the first difference, so the
    /// time of a refusal does not tell a guesser how much of the guess was right.
    fn matches(&self, presented: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), presented.as_bytes());
        let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
        a.len() == b.len() && std::hint::black_box(diff) == 0
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum Request {
    /// The first line of every connection.
    Hello { token: String },
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
    /// Listens on `bind` (port 0 picks a free one) and serves clients that present `token`.
    pub fn start(bind: SocketAddr, token: RendezvousToken) -> Result<StoreServer> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| LaunchError::io("starting the store's runtime", e))?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(bind))
            .map_err(|e| LaunchError::io(format!("rendezvous store: cannot listen on {bind} (is MASTER_PORT taken by another job?)"), e))?;
        let addr = listener.local_addr().map_err(|e| LaunchError::io("rendezvous store address", e))?;
        let (tx, mut rx) = oneshot::channel::<()>();
        let token = Arc::new(token);
        let thread = std::thread::spawn(move || {
            let shared = Arc::new(Shared::default());
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        accepted = listener.accept() => {
                            if let Ok((socket, _)) = accepted {
                                tokio::spawn(serve(socket, shared.clone(), token.clone()));
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

/// One line of at most `max` bytes, without its newline; `None` at the end of the stream, or
/// when the line is longer or cut off (the caller then drops the connection).
async fn read_line(reader: &mut (impl AsyncBufRead + Unpin), max: usize) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    reader.take(max as u64 + 1).read_until(b'\n', &mut line).await.ok()?;
    (line.pop() == Some(b'\n')).then_some(line)
}

/// Serves one connection: the token first, then requests until the client leaves or breaks a
/// limit.
async fn serve(socket: tokio::net::TcpStream, shared: Arc<Shared>, token: Arc<RendezvousToken>) {
    let (read, mut write) = socket.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    let hello = tokio::time::timeout(HELLO_DEADLINE, read_line(&mut reader, MAX_HELLO_LINE)).await.ok().flatten();
    let admitted = match hello.map(|line| serde_json::from_slice::<Request>(&line)) {
        Some(Ok(Request::Hello { token: presented })) => token.matches(&presented),
        _ => false,
    };
    if !admitted {
        let _ = send(&mut write, Reply::Error("this rendezvous store admits only ranks that present the job's token".into())).await;
        return;
    }
    if send(&mut write, Reply::Done).await.is_err() {
        return;
    }
    while let Some(line) = read_line(&mut reader, MAX_LINE).await {
        let reply = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => handle(req, &shared).await,
            Err(e) => Reply::Error(format!("bad request: {e}")),
        };
        if send(&mut write, reply).await.is_err() {
            return;
        }
    }
}

/// Writes `reply` as one line, or an error in its place when it would exceed `MAX_LINE`.
async fn send(write: &mut tokio::net::tcp::OwnedWriteHalf, reply: Reply) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    if out.len() > MAX_LINE {
        let error = Reply::Error(format!("the reply would be {} bytes, over the {MAX_LINE}-byte line limit; wait for fewer keys at a time", out.len()));
        out = serde_json::to_vec(&error).map_err(std::io::Error::other)?;
    }
    out.push(b'\n');
    write.write_all(&out).await
}

async fn handle(req: Request, shared: &Shared) -> Reply {
    match req {
        Request::Hello { .. } => Reply::Done,
        Request::Set { key, value } => {
            if key.len() > MAX_KEY_LEN || value.len() > MAX_VALUE_LEN {
                return Reply::Error(format!(
                    "key of {} bytes or value of {} bytes is over the store's limit ({MAX_KEY_LEN} and {MAX_VALUE_LEN})",
                    key.len(),
                    value.len()
                ));
            }
            {
                let Ok(mut map) = shared.map.lock() else { return Reply::Error("store state poisoned".into()) };
                if map.len() >= MAX_KEYS && !map.contains_key(&key) {
                    return Reply::Error(format!("the store holds its maximum of {MAX_KEYS} keys"));
                }
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

/// A blocking connection to the store, admitted with the job's token.
pub struct StoreClient {
    reader: BufReader<TcpStream>,
    addr: String,
}

impl StoreClient {
    /// Connects, retrying until `timeout` (rank 0 may start after the others), and presents
    /// `token`; a store that refuses it fails at once.
    pub fn connect(master: &Master, token: &RendezvousToken, timeout: Duration) -> Result<StoreClient> {
        let addr = master.to_string();
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = (master.addr.as_str(), master.port).to_socket_addrs().ok().and_then(|mut a| a.next()).and_then(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(2)).ok());
            if let Some(stream) = attempt {
                let _ = stream.set_nodelay(true);
                let mut client = StoreClient { reader: BufReader::new(stream), addr };
                client.hello(token)?;
                return Ok(client);
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

    fn hello(&mut self, token: &RendezvousToken) -> Result<()> {
        match self.call(&Request::Hello { token: token.0.clone() }, Some(HELLO_DEADLINE))? {
            Reply::Done => Ok(()),
            Reply::Error(_) => Err(LaunchError::Store {
                addr: self.addr.clone(),
                problem: format!("refused this rank's token: every rank must have rank 0's {TOKEN_VAR} (neurofm-launch and the slurm/ scripts give all ranks of a job the same one)"),
            }),
            other => Err(self.unexpected(other)),
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
        // Bounded like the server's lines: whatever answers on MASTER_PORT cannot grow our memory.
        let mut answer = Vec::new();
        match (&mut self.reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut answer) {
            Ok(0) => Err(store_err("rank 0 closed the connection; did it exit?".into())),
            Ok(_) if answer.last() != Some(&b'\n') => {
                Err(store_err(format!("the reply is longer than {MAX_LINE} bytes or cut off; is MASTER_PORT the port of another service?")))
            }
            Ok(_) => serde_json::from_slice(&answer).map_err(|e| store_err(format!("bad reply: {e}"))),
            Err(e) => Err(store_err(format!("no reply ({e})"))),
        }
    }

    fn unexpected(&self, reply: Reply) -> LaunchError {
        let problem = match reply {
            Reply::Error(message) => message,
            other => format!("unexpected reply {other:?}"),
        };
        LaunchError::Store { addr: self.addr.clone(), problem }
    }
}

/// A joined group: the store connection (and, on rank 0, the server) stay open for later
/// exchanges such as the NCCL id.
pub struct Rendezvous {
    pub client: StoreClient,
    pub rank: usize,
    world: usize,
    timeout: Duration,
    _server: Option<StoreServer>,
}

impl Rendezvous {
    /// Ranks of the group.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Joins with the job's token from `NEUROFM_RENDEZVOUS_TOKEN` (see [`Rendezvous::join_with`]);
    /// refuses to start when it is unset, since the store would then admit anyone.
    pub fn join(env: &DistEnv, timeout: Duration) -> Result<Rendezvous> {
        let master = env.require_master()?;
        let token = RendezvousToken::from_env().map_err(|e| LaunchError::Config(format!("rank {} of {} cannot meet the others at {master}: {e}", env.rank, env.world)))?;
        Rendezvous::join_with(env, &token, timeout)
    }

    /// Rank 0 serves the store on the master port; every rank announces itself and waits for
    /// all others until `timeout`, failing with the list of ranks that never came.
    pub fn join_with(env: &DistEnv, token: &RendezvousToken, timeout: Duration) -> Result<Rendezvous> {
        let master = env.require_master()?;
        let server = if env.rank == 0 { Some(StoreServer::start(bind_addr(master), token.clone())?) } else { None };
        let client = StoreClient::connect(master, token, timeout)?;
        let mut rdv = Rendezvous { client, rank: env.rank, world: env.world, timeout, _server: server };
        let missing = rdv.meet("arrived", hostname().as_bytes(), timeout)?;
        if !missing.is_empty() {
            let ranks: Vec<String> = missing.iter().map(usize::to_string).collect();
            return Err(LaunchError::Timeout(format!(
                "rank(s) {} of {} did not join the rendezvous at {master} within {:.0} s (seen from rank {}); check that every rank was started and can reach {master} (NEUROFM_RENDEZVOUS_TIMEOUT sets the deadline)",
                ranks.join(", "),
                env.world,
                timeout.as_secs_f64(),
                env.rank
            )));
        }
        Ok(rdv)
    }

    /// Checks this rank in under `name` (with `value`) and waits until `timeout` for every
    /// other rank to do the same; returns the ranks that did not (empty: all met). Used for the
    /// join, set-up barriers and, after a failed collective, to find the ranks that never
    /// reached it.
    pub fn meet(&mut self, name: &str, value: &[u8], timeout: Duration) -> Result<Vec<usize>> {
        self.client.set(&format!("{name}/{}", self.rank), value)?;
        let deadline = Instant::now() + timeout;
        let keys: Vec<String> = (0..self.world).map(|r| format!("{name}/{r}")).collect();
        let mut missing = Vec::new();
        for chunk in keys.chunks(JOIN_CHUNK) {
            if let Err(m) = self.client.wait(chunk, deadline.saturating_duration_since(Instant::now()))? {
                missing.extend(m.iter().filter_map(|k| k.rsplit('/').next()?.parse::<usize>().ok()));
            }
        }
        Ok(missing)
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

/// Where rank 0 listens: only on loopback when the ranks reach it there (one node), else on
/// every interface, since other nodes connect to whatever MASTER_ADDR resolves to on their side.
fn bind_addr(master: &Master) -> SocketAddr {
    match master.addr.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => SocketAddr::new(ip, master.port),
        _ => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), master.port),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn local(port: u16, rank: usize, world: usize) -> DistEnv {
        DistEnv { rank, world, local_rank: rank, local_world: world, master: Some(Master { addr: "127.0.0.1".into(), port }), source: crate::env::Source::Launcher }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn token() -> RendezvousToken {
        RendezvousToken::generate().unwrap()
    }

    fn server(token: &RendezvousToken) -> (StoreServer, Master) {
        let server = StoreServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), token.clone()).unwrap();
        let master = Master { addr: "127.0.0.1".into(), port: server.addr().port() };
        (server, master)
    }

    /// Sends `lines` on a fresh connection and returns every line the store answers until it
    /// closes the connection (a reset counts as closed).
    fn raw_exchange(master: &Master, lines: &[serde_json::Value]) -> Vec<String> {
        let mut stream = TcpStream::connect((master.addr.as_str(), master.port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        for line in lines {
            let _ = stream.write_all(format!("{line}\n").as_bytes());
        }
        let mut replies = Vec::new();
        for line in BufReader::new(stream).lines() {
            match line {
                Ok(l) => replies.push(l),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
                Err(e) => panic!("the store neither answered nor closed the connection: {e}"),
            }
        }
        replies
    }

    fn vm_rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Runs `work` on another thread and samples this process's resident memory until it
    /// returns; gives its result and the largest growth of VmRSS in KiB.
    fn peak_rss_growth_while<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> (T, u64) {
        let before = vm_rss_kib();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let worker = std::thread::spawn(move || {
            let result = work();
            flag.store(true, Ordering::SeqCst);
            result
        });
        let mut peak = before;
        while !done.load(Ordering::SeqCst) {
            peak = peak.max(vm_rss_kib());
            std::thread::sleep(Duration::from_millis(2));
        }
        peak = peak.max(vm_rss_kib());
        (worker.join().unwrap(), peak.saturating_sub(before))
    }

    const ENDLESS: u64 = 256 << 20;

    /// Writes up to 256 MiB of `x` without a newline after `prefix`; stops when the peer
    /// closes the connection. Returns the bytes written.
    fn endless_line(mut stream: TcpStream, prefix: Vec<u8>) -> u64 {
        let chunk = vec![b'x'; 1 << 20];
        let _ = stream.write_all(&prefix);
        let mut sent = 0;
        while sent < ENDLESS {
            if stream.write_all(&chunk).is_err() {
                break;
            }
            sent += chunk.len() as u64;
        }
        sent
    }

    #[test]
    fn ranks_meet_and_share_a_value() {
        let port = free_port();
        let token = token();
        let handles: Vec<_> = (0..3)
            .map(|r| {
                let token = token.clone();
                std::thread::spawn(move || {
                    // Rank 0 starts last: the others retry until its store is up.
                    if r == 0 {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                    let mut rdv = Rendezvous::join_with(&local(port, r, 3), &token, Duration::from_secs(10)).unwrap();
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
        let token = token();
        let start = Instant::now();
        let e = Rendezvous::join_with(&local(port, 0, 3), &token, Duration::from_millis(500)).err().unwrap().to_string();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(e.contains("rank(s) 1, 2 of 3 did not join"), "{e}");
        // Without rank 0, others fail naming the store.
        let e = Rendezvous::join_with(&local(port, 1, 2), &token, Duration::from_millis(300)).err().unwrap().to_string();
        assert!(e.contains("could not reach the rendezvous store of rank 0"), "{e}");
    }

    #[test]
    fn a_large_world_joins_in_lines_below_the_limit() {
        // 2000 ranks' arrivals in one reply would be far over MAX_LINE: the join waits for
        // them in slices.
        let (port, token) = (free_port(), token());
        let world = 2000;
        let rank0 = {
            let token = token.clone();
            std::thread::spawn(move || Rendezvous::join_with(&local(port, 0, world), &token, Duration::from_secs(30)))
        };
        let master = Master { addr: "127.0.0.1".into(), port };
        let mut others = StoreClient::connect(&master, &token, Duration::from_secs(10)).unwrap();
        for r in 1..world {
            others.set(&format!("arrived/{r}"), &[b'n'; 64]).unwrap();
        }
        let joined = rank0.join().unwrap();
        assert!(joined.is_ok(), "{:?}", joined.as_ref().err());
        // The same in one request: the reply would not fit in a line.
        let all: Vec<String> = (0..world).map(|r| format!("arrived/{r}")).collect();
        let e = others.wait(&all, Duration::from_secs(10)).unwrap_err().to_string();
        assert!(e.contains("line limit"), "{e}");
    }

    #[test]
    fn a_client_without_the_token_can_neither_read_nor_write() {
        let token = token();
        let (_server, master) = server(&token);
        let mut rank = StoreClient::connect(&master, &token, Duration::from_secs(5)).unwrap();
        rank.set("nccl/unique-id", b"the real id").unwrap();

        let wrong = serde_json::json!({"Hello": {"token": "0123456789abcdef0123456789abcdef"}});
        let set = serde_json::json!({"Set": {"key": "nccl/unique-id", "value": [1, 2, 3]}});
        let planted = serde_json::json!({"Set": {"key": "planted", "value": [1]}});
        let wait = serde_json::json!({"Wait": {"keys": ["nccl/unique-id"], "timeout_ms": 100}});
        for attempt in [vec![set.clone(), planted.clone()], vec![wrong.clone(), set, planted], vec![wait.clone()], vec![wrong, wait]] {
            let replies = raw_exchange(&master, &attempt);
            // One refusal, then the store hangs up: nothing is read back, nothing else answered.
            assert_eq!(replies.len(), 1, "{attempt:?} → {replies:?}");
            assert!(replies[0].contains("Error") && replies[0].contains("token"), "{replies:?}");
        }
        assert_eq!(rank.wait(&["nccl/unique-id".into()], Duration::from_millis(100)).unwrap(), Ok(vec![b"the real id".to_vec()]));
        assert_eq!(rank.wait(&["planted".into()], Duration::from_millis(100)).unwrap(), Err(vec!["planted".into()]));
        let e = StoreClient::connect(&master, &RendezvousToken::new("not-the-right-token").unwrap(), Duration::from_secs(5)).err().unwrap().to_string();
        assert!(e.contains("refused this rank's token"), "{e}");
    }

    #[test]
    fn an_endless_line_leaves_the_server_memory_bounded() {
        let token = token();
        let (_server, master) = server(&token);
        let connect = || TcpStream::connect((master.addr.as_str(), master.port)).unwrap();
        // Before the token, and after it (a rank gone wrong).
        let hello = format!("{}\n", serde_json::json!({"Hello": {"token": token.as_str()}})).into_bytes();
        for prefix in [Vec::new(), hello] {
            let stream = connect();
            let (sent, growth_kib) = peak_rss_growth_while(move || endless_line(stream, prefix));
            assert!(sent < ENDLESS, "the store read all {sent} bytes of a line without a newline");
            assert!(growth_kib < 8 * 1024, "the store's process grew by {growth_kib} KiB while reading a {sent}-byte line");
        }
        // Ranks with the token are still served.
        let mut rank = StoreClient::connect(&master, &token, Duration::from_secs(5)).unwrap();
        rank.set("k", b"v").unwrap();
        assert_eq!(rank.wait(&["k".into()], Duration::from_secs(1)).unwrap(), Ok(vec![b"v".to_vec()]));
    }

    #[test]
    fn the_client_bounds_the_replies_it_reads() {
        // Something else on MASTER_PORT answers the token with an endless line.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let master = Master { addr: "127.0.0.1".into(), port: listener.local_addr().unwrap().port() };
        let impostor = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut hello = String::new();
            BufReader::new(stream.try_clone().unwrap()).read_line(&mut hello).unwrap();
            endless_line(stream, Vec::new())
        });
        let token = token();
        let (error, growth_kib) = peak_rss_growth_while(move || StoreClient::connect(&master, &token, Duration::from_secs(10)).err().map(|e| e.to_string()));
        let sent = impostor.join().unwrap();
        assert!(error.as_deref().is_some_and(|e| e.contains("longer than 65536 bytes")), "{error:?}");
        assert!(sent < ENDLESS, "the client read all {sent} bytes of a reply without a newline");
        assert!(growth_kib < 8 * 1024, "the client grew by {growth_kib} KiB while reading a {sent}-byte reply");
    }

    #[test]
    fn oversized_and_too_many_keys_are_refused() {
        let token = token();
        let (_server, master) = server(&token);
        let mut rank = StoreClient::connect(&master, &token, Duration::from_secs(5)).unwrap();
        let e = rank.set(&"k".repeat(MAX_KEY_LEN + 1), b"v").unwrap_err().to_string();
        assert!(e.contains("over the store's limit"), "{e}");
        let e = rank.set("big", &vec![7; MAX_VALUE_LEN + 1]).unwrap_err().to_string();
        assert!(e.contains("over the store's limit"), "{e}");
        for i in 0..MAX_KEYS {
            rank.set(&i.to_string(), b"").unwrap();
        }
        let e = rank.set("one more", b"").unwrap_err().to_string();
        assert!(e.contains("maximum of 16384 keys"), "{e}");
        rank.set("0", b"overwriting is fine").unwrap();
    }

    #[test]
    fn tokens_are_random_hidden_and_checked() {
        let (a, b) = (token(), token());
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(!format!("{a:?}").contains(a.as_str()));
        assert!(a.matches(a.as_str()) && !a.matches(b.as_str()) && !a.matches(&a.as_str()[..31]));
        for bad in ["", "short", "has spaces in the middle of it"] {
            let e = RendezvousToken::new(bad).unwrap_err().to_string();
            assert!(e.contains(TOKEN_VAR) && (bad.is_empty() || !e.contains(bad)), "{e}");
        }
        let unset = RendezvousToken::from_var(Err(std::env::VarError::NotPresent)).unwrap_err().to_string();
        assert!(unset.contains("NEUROFM_RENDEZVOUS_TOKEN is not set") && unset.contains("/dev/urandom"), "{unset}");
    }
}
