//! A fault-injecting HTTP proxy for the S3 emulator (loopback only, std threads).
//!
//! Every request is forwarded with `Connection: close`, so each connection carries exactly one
//! request and the proxy sees every request line. Armed with a needle (a WAL file name) and a
//! [`Fault`], the proxy serves normally until the first request whose request line contains the
//! needle; from then on, until disarmed, it answers *every* request with the fault: the endpoint
//! has gone away in the middle of a recovery.
//!
//! [`Fault::Stall`] holds each faulted connection open without answering until the proxy is
//! disarmed, re-armed or dropped; the connection's thread sleeps on a condition variable
//! meanwhile.
//!
//! Besides that sticky fault, which does not outlive its arming, the proxy can:
//! - answer only the requests whose line contains a needle with a fault, each of them and no
//!   other ([`FaultProxy::fail_each`]): a store refusing part uploads while everything else works;
//! - cut responses after a number of bytes, for the next few requests naming a needle
//!   ([`FaultProxy::cut`]), optionally running a hook (replacing the object, say) before the
//!   connection is closed: a download interrupted mid-body;
//! - throttle every connection, each way, to a number of bytes per second
//!   ([`FaultProxy::throttle`]): a slow link, on which a large object takes longer to move than
//!   any single-request time limit.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::http::head_end;

/// What the proxy does to requests once tripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Close the client's connection without a byte of answer (the endpoint is gone).
    Drop,
    /// Answer `403 Forbidden` with an S3 `AccessDenied` error (permission withdrawn).
    Forbidden,
    /// Read the request head, then never answer: the connection stays open, silent, until the
    /// proxy is disarmed, re-armed or dropped (then it is closed). A request body beyond what
    /// the kernel buffers is never read, so an upload stalls too.
    Stall,
}

/// Runs in the proxy when a response is cut, before the client's connection is closed.
pub type CutHook = Box<dyn FnMut() + Send>;

/// Responses to cut: the next `times` requests whose line contains `needle` get at most
/// `after` bytes of their response (head included), then the connection is closed.
struct CutRule {
    needle: String,
    after: u64,
    times: u32,
    hook: Option<CutHook>,
}

impl std::fmt::Debug for CutRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CutRule")
            .field("needle", &self.needle)
            .field("after", &self.after)
            .field("times", &self.times)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

#[derive(Debug, Default)]
struct State {
    armed: Option<(String, Fault)>,
    /// Faults for every request naming a needle, and for no other (see `fail_each`).
    each: Vec<(String, Fault)>,
    cut: Option<CutRule>,
    /// Responses cut so far.
    cuts: u64,
    /// Bytes per second of every response, when set.
    throttle: Option<u64>,
    tripped: bool,
    faulted: u64,
    request_lines: Vec<String>,
    /// Bumped by every arm, disarm and drop: a stall lasts while this stays what it was.
    epoch: u64,
    stopped: bool,
    /// Connections held open by [`Fault::Stall`] right now.
    stalled: u64,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled whenever `epoch` changes.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the current arming: stalled connections are released.
    fn bump(&self, s: &mut State) {
        s.epoch += 1;
        self.changed.notify_all();
    }
}

/// A running proxy. Dropping it stops accepting connections and releases stalled ones.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// Largest request head the proxy accepts.
const MAX_HEAD: usize = 64 * 1024;

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `upstream`.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the proxy's loopback port");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sh.lock().stopped {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let sh = sh.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, &sh);
                });
            }
        });
        FaultProxy { addr, shared }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From the first request whose request line contains `needle`, answer every request with
    /// `fault`.
    pub fn arm(&self, needle: &str, fault: Fault) {
        let mut s = self.lock();
        s.armed = Some((needle.to_string(), fault));
        s.tripped = false;
        self.shared.bump(&mut s);
    }

    /// Serve normally again.
    pub fn disarm(&self) {
        let mut s = self.lock();
        s.armed = None;
        s.each.clear();
        s.cut = None;
        s.tripped = false;
        self.shared.bump(&mut s);
    }

    /// Answer every request whose line contains `needle` with `fault` (not sticky: other
    /// requests are served). Adds to the needles given before; [`FaultProxy::disarm`] clears
    /// them.
    pub fn fail_each(&self, needle: &str, fault: Fault) {
        self.lock().each.push((needle.to_string(), fault));
    }

    /// Cut the responses to the next `times` requests whose line contains `needle` after
    /// `after` bytes (head included): the client sees the connection close mid-body.
    pub fn cut(&self, needle: &str, after: u64, times: u32) {
        self.cut_then(needle, after, times, None);
    }

    /// Like [`FaultProxy::cut`], running `hook` in the proxy after each cut, before the client's
    /// connection is closed (so the client cannot ask again before the hook is done).
    pub fn cut_then(&self, needle: &str, after: u64, times: u32, hook: Option<CutHook>) {
        self.lock().cut = Some(CutRule {
            needle: needle.to_string(),
            after,
            times,
            hook,
        });
    }

    /// How many responses were cut so far.
    pub fn cuts(&self) -> u64 {
        self.lock().cuts
    }

    /// Move every request and response body at most `bytes_per_second`, each connection and
    /// direction on its own (`None`: as fast as it comes).
    pub fn throttle(&self, bytes_per_second: Option<u64>) {
        self.lock().throttle = bytes_per_second;
    }

    /// How many requests got the fault so far.
    pub fn faulted(&self) -> u64 {
        self.lock().faulted
    }

    /// How many connections [`Fault::Stall`] holds open right now.
    pub fn stalled(&self) -> u64 {
        self.lock().stalled
    }

    /// Every request line seen so far.
    pub fn request_lines(&self) -> Vec<String> {
        self.lock().request_lines.clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        {
            let mut s = self.lock();
            s.stopped = true;
            self.shared.bump(&mut s);
        }
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn serve(mut client: TcpStream, upstream: SocketAddr, shared: &Shared) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let end = loop {
        if let Some(end) = head_end(&buf) {
            break end;
        }
        if buf.len() > MAX_HEAD {
            return Ok(());
        }
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let request_line = head.lines().next().unwrap_or("").to_string();

    let (fault, epoch, cut_after, throttle) = {
        let mut s = shared.lock();
        s.request_lines.push(request_line.clone());
        let each = s
            .each
            .iter()
            .find(|(needle, _)| request_line.contains(needle.as_str()))
            .map(|(_, f)| *f);
        let cut_after = match &mut s.cut {
            Some(rule) if rule.times > 0 && request_line.contains(rule.needle.as_str()) => {
                rule.times -= 1;
                Some(rule.after)
            }
            _ => None,
        };
        let fault = if let Some(f) = each {
            s.faulted += 1;
            Some(f)
        } else if let Some((needle, fault)) = &s.armed {
            let fault = *fault;
            if s.tripped || request_line.contains(needle.as_str()) {
                s.tripped = true;
                s.faulted += 1;
                Some(fault)
            } else {
                None
            }
        } else {
            None
        };
        (fault, s.epoch, cut_after, s.throttle)
    };
    match fault {
        Some(Fault::Stall) => {
            // Hold the connection, unanswered, until the arming changes or the proxy goes.
            let mut s = shared.lock();
            s.stalled += 1;
            while s.epoch == epoch && !s.stopped {
                s = shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.stalled -= 1;
            drop(s);
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        Some(Fault::Drop) => {
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        Some(Fault::Forbidden) => {
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code>\
                        <Message>Access Denied</Message></Error>";
            let resp = format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            client.write_all(resp.as_bytes())?;
            let _ = client.shutdown(Shutdown::Both);
            return Ok(());
        }
        None => {}
    }

    // Rewrite the head: one request per connection.
    let mut new_head = String::with_capacity(head.len() + 32);
    for (i, line) in head.trim_end_matches("\r\n").split("\r\n").enumerate() {
        let name = line.split(':').next().unwrap_or("").trim();
        if i > 0
            && ["connection", "keep-alive", "proxy-connection"]
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h))
        {
            continue;
        }
        new_head.push_str(line);
        new_head.push_str("\r\n");
    }
    new_head.push_str("Connection: close\r\n\r\n");

    let mut up = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))?;
    up.write_all(new_head.as_bytes())?;
    up.write_all(&buf[end..])?;

    // Client → upstream (the rest of a request body) in a thread; upstream → client here. The
    // upstream closes after its one response; then both sockets are shut, which also ends the
    // other direction.
    client.set_read_timeout(None)?;
    let mut client_r = client.try_clone()?;
    let mut up_w = up.try_clone()?;
    let pump = std::thread::spawn(move || {
        relay(&mut client_r, &mut up_w, None, throttle);
        let _ = up_w.shutdown(Shutdown::Write);
    });
    let cut = relay(&mut up, &mut client, cut_after, throttle);
    if cut {
        // Count and run the hook before the client learns of the cut.
        let hook = {
            let mut s = shared.lock();
            s.cuts += 1;
            s.cut.as_mut().and_then(|r| r.hook.take())
        };
        if let Some(mut hook) = hook {
            hook();
            if let Some(rule) = shared.lock().cut.as_mut()
                && rule.hook.is_none()
            {
                rule.hook = Some(hook);
            }
        }
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = up.shutdown(Shutdown::Both);
    let _ = pump.join();
    Ok(())
}

/// Copies one direction of a connection (the upstream's response to the client, or the rest of
/// the request to the upstream), at most `throttle` bytes per second, and at most `cut_after`
/// bytes. Returns whether the copy was cut short.
fn relay(
    from: &mut TcpStream,
    to: &mut TcpStream,
    cut_after: Option<u64>,
    throttle: Option<u64>,
) -> bool {
    // Small pieces, so that a throttled response still moves several times a second.
    let mut buf = [0u8; 16 * 1024];
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    loop {
        let mut want = buf.len();
        if let Some(limit) = cut_after {
            let left = limit.saturating_sub(sent);
            if left == 0 {
                return true;
            }
            want = want.min(usize::try_from(left).unwrap_or(usize::MAX));
        }
        let n = match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            return false;
        }
        sent += n as u64;
        if let Some(rate) = throttle.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}
