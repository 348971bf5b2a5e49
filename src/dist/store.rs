//! The rendezvous store: a small key-value store over TCP that rank 0 hosts at
//! `MASTER_ADDR:MASTER_PORT` (a thread per client). Ranks publish their socket addresses, the
//! NCCL unique id and join records here; `get` waits for a key up to a deadline.
//! Wire format, one request at a time per connection: `op u8, key (u32 len + bytes), value
//! (u32 len + bytes), wait_ms u64` → `status u8, value (u32 len + bytes)`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::{Error, Result};

const SET: u8 = 1;
const SET_NEW: u8 = 2;
const GET: u8 = 3;

const OK: u8 = 0;
const EXISTS: u8 = 1;
const MISSING: u8 = 2;

/// Largest key or value the store accepts (NCCL ids and addresses are far smaller).
const MAX_FIELD: u32 = 1 << 20;

#[derive(Default)]
struct Table {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

/// Hosts the store on `0.0.0.0:port` for the life of the process.
pub(crate) fn serve(port: u16) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).map_err(|e| Error::Rendezvous {
        addr: format!("0.0.0.0:{port}"),
        msg: format!(
            "rank 0 cannot host the store on port {port}: {e} (is another job or a stale \
             process using it? pick another MASTER_PORT)"
        ),
    })?;
    let table = Arc::new(Table::default());
    std::thread::Builder::new()
        .name("moe-store".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let table = table.clone();
                // A client that misbehaves only loses its own connection.
                std::thread::spawn(move || {
                    let _ = serve_client(conn, &table);
                });
            }
        })
        .map_err(|e| Error::invalid("store", format!("cannot start the store thread: {e}")))?;
    Ok(())
}

fn serve_client(mut conn: TcpStream, table: &Table) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    loop {
        let mut op = [0u8];
        if conn.read(&mut op)? == 0 {
            return Ok(());
        }
        let key = String::from_utf8_lossy(&read_field(&mut conn)?).into_owned();
        let value = read_field(&mut conn)?;
        let mut wait = [0u8; 8];
        conn.read_exact(&mut wait)?;
        let wait = Duration::from_millis(u64::from_le_bytes(wait));
        let (status, reply) = {
            let mut map = table.map.lock().map_err(|_| std::io::ErrorKind::Other)?;
            match op[0] {
                SET => {
                    map.insert(key, value);
                    table.changed.notify_all();
                    (OK, Vec::new())
                }
                SET_NEW => match map.get(&key) {
                    Some(old) => (EXISTS, old.clone()),
                    None => {
                        map.insert(key, value);
                        table.changed.notify_all();
                        (OK, Vec::new())
                    }
                },
                GET => {
                    let deadline = Instant::now() + wait;
                    loop {
                        if let Some(v) = map.get(&key) {
                            break (OK, v.clone());
                        }
                        let now = Instant::now();
                        if now >= deadline {
                            break (MISSING, Vec::new());
                        }
                        map = table
                            .changed
                            .wait_timeout(map, deadline - now)
                            .map_err(|_| std::io::ErrorKind::Other)?
                            .0;
                    }
                }
                _ => return Err(std::io::ErrorKind::InvalidData.into()),
            }
        };
        let mut out = vec![status];
        write_field(&mut out, &reply);
        conn.write_all(&out)?;
    }
}

fn read_field(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    conn.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FIELD {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    let mut v = vec![0u8; len as usize];
    conn.read_exact(&mut v)?;
    Ok(v)
}

fn write_field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A connection to the store.
pub(crate) struct StoreClient {
    conn: Mutex<TcpStream>,
    addr: String,
    timeout: Duration,
}

impl StoreClient {
    /// Connects to `addr` (`host:port`), retrying until `timeout` passes (rank 0 may start later).
    pub(crate) fn connect(addr: &str, timeout: Duration) -> Result<StoreClient> {
        let err = |msg: String| Error::Rendezvous {
            addr: addr.to_string(),
            msg,
        };
        let targets: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| err(format!("cannot resolve MASTER_ADDR: {e}")))?
            .collect();
        let deadline = Instant::now() + timeout;
        let conn = loop {
            let last = match try_connect(&targets, deadline) {
                Ok(c) => break c,
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(err(format!(
                    "could not reach the store within {:.1} s ({last}); rank 0 hosts it: is \
                     MASTER_ADDR/MASTER_PORT right and did rank 0 start?",
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        conn.set_nodelay(true)
            .map_err(|e| err(format!("socket setup: {e}")))?;
        Ok(StoreClient {
            conn: Mutex::new(conn),
            addr: addr.to_string(),
            timeout,
        })
    }

    /// The local address of the connection to the store: the interface that reaches the master,
    /// so also one that peers reach this process on.
    pub(crate) fn local_ip(&self) -> Result<std::net::IpAddr> {
        let conn = self.conn.lock().map_err(|_| self.err("lock poisoned"))?;
        conn.local_addr()
            .map(|a| a.ip())
            .map_err(|e| self.err(&format!("local address: {e}")))
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    fn err(&self, msg: &str) -> Error {
        Error::Rendezvous {
            addr: self.addr.clone(),
            msg: msg.to_string(),
        }
    }

    fn request(&self, op: u8, key: &str, value: &[u8], wait: Duration) -> Result<(u8, Vec<u8>)> {
        let mut msg = vec![op];
        write_field(&mut msg, key.as_bytes());
        write_field(&mut msg, value);
        msg.extend_from_slice(&(wait.as_millis() as u64).to_le_bytes());
        let mut conn = self.conn.lock().map_err(|_| self.err("lock poisoned"))?;
        let io = |e: std::io::Error| {
            let what = match e.kind() {
                std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe => {
                    "rank 0, which hosts the store, closed the connection (exited or crashed)"
                        .to_string()
                }
                _ => format!("store request for '{key}' failed: {e}"),
            };
            self.err(&what)
        };
        conn.set_write_timeout(Some(self.timeout)).map_err(io)?;
        conn.set_read_timeout(Some(wait + self.timeout))
            .map_err(io)?;
        conn.write_all(&msg).map_err(io)?;
        let mut status = [0u8];
        conn.read_exact(&mut status).map_err(io)?;
        let reply = read_field(&mut conn).map_err(io)?;
        Ok((status[0], reply))
    }

    pub(crate) fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.request(SET, key, value, Duration::ZERO).map(|_| ())
    }

    /// Sets `key` unless it exists; `Err(old value)` when it does.
    pub(crate) fn set_new(
        &self,
        key: &str,
        value: &[u8],
    ) -> Result<std::result::Result<(), Vec<u8>>> {
        let (status, old) = self.request(SET_NEW, key, value, Duration::ZERO)?;
        Ok(if status == EXISTS { Err(old) } else { Ok(()) })
    }

    /// The value of `key`, waiting until `deadline` for it to be set; `None` if it never was.
    pub(crate) fn get_until(&self, key: &str, deadline: Instant) -> Result<Option<Vec<u8>>> {
        let wait = deadline.saturating_duration_since(Instant::now());
        let (status, value) = self.request(GET, key, &[], wait)?;
        Ok((status == OK).then_some(value))
    }

    /// The values of `keys[i]` for every i, waiting until `deadline`; on timeout, the indices
    /// whose keys never appeared.
    pub(crate) fn get_all(
        &self,
        keys: &[String],
        deadline: Instant,
    ) -> Result<std::result::Result<Vec<Vec<u8>>, Vec<usize>>> {
        let mut values = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            // After the first miss the deadline has passed: the rest are checked without waiting.
            match self.get_until(key, deadline)? {
                Some(v) => values.push(v),
                None => missing.push(i),
            }
        }
        Ok(if missing.is_empty() {
            Ok(values)
        } else {
            Err(missing)
        })
    }
}

fn try_connect(targets: &[SocketAddr], deadline: Instant) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
    for t in targets {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        match TcpStream::connect_timeout(t, left.min(Duration::from_secs(5))) {
            Ok(c) => return Ok(c),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn set_get_wait_and_set_new() {
        let port = free_port();
        serve(port).unwrap();
        let addr = format!("127.0.0.1:{port}");
        let a = StoreClient::connect(&addr, Duration::from_secs(5)).unwrap();
        let b = StoreClient::connect(&addr, Duration::from_secs(5)).unwrap();
        let soon = || Instant::now() + Duration::from_millis(100);
        assert_eq!(a.get_until("k", soon()).unwrap(), None);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            b.set("k", b"v1").unwrap();
            b
        });
        let waited = a
            .get_until("k", Instant::now() + Duration::from_secs(5))
            .unwrap();
        assert_eq!(waited.as_deref(), Some(&b"v1"[..]));
        let b = writer.join().unwrap();
        assert_eq!(b.set_new("n", b"first").unwrap(), Ok(()));
        assert_eq!(a.set_new("n", b"second").unwrap(), Err(b"first".to_vec()));
        let keys = [
            "k".to_string(),
            "x".to_string(),
            "n".to_string(),
            "y".to_string(),
        ];
        assert_eq!(a.get_all(&keys, soon()).unwrap(), Err(vec![1, 3]));
        // A second store on the same port: the port is in use.
        let e = serve(port).unwrap_err().to_string();
        assert!(
            e.contains(&format!("port {port}")) && e.contains("MASTER_PORT"),
            "{e}"
        );
    }

    #[test]
    fn unreachable_master_times_out() {
        let port = free_port();
        let t0 = Instant::now();
        let e = StoreClient::connect(&format!("127.0.0.1:{port}"), Duration::from_millis(500))
            .err()
            .unwrap()
            .to_string();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(e.contains("could not reach the store within 0.5 s"), "{e}");
        let e = StoreClient::connect("no-such-host.invalid:1", Duration::from_millis(500))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot resolve MASTER_ADDR"), "{e}");
    }
}
