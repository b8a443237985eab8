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

#[derive(Debug, Default)]
struct State {
    armed: Option<(String, Fault)>,
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
        s.tripped = false;
        self.shared.bump(&mut s);
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

    let (fault, epoch) = {
        let mut s = shared.lock();
        s.request_lines.push(request_line.clone());
        let fault = if let Some((needle, fault)) = &s.armed {
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
        (fault, s.epoch)
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
        let _ = std::io::copy(&mut client_r, &mut up_w);
        let _ = up_w.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut up, &mut client);
    let _ = client.shutdown(Shutdown::Both);
    let _ = up.shutdown(Shutdown::Both);
    let _ = pump.join();
    Ok(())
}
