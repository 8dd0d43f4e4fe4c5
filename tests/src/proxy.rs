//! A fault-injecting TCP proxy for partition and latency tests (the kernel here has no
//! `netem`): forwards connections to a target until told to partition, then cuts every
//! connection and refuses new ones until healed; can delay everything the target sends (a slow
//! next hop).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The proxy; dropping it stops forwarding new connections.
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    partitioned: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    reply_delay_ms: Arc<AtomicU64>,
    connections: Arc<Connections>,
}

/// Connections through the proxy now, and the most at once.
#[derive(Default)]
struct Connections {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl FaultProxy {
    /// Listens on a free loopback port, forwarding to `target`.
    pub fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let partitioned = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let reply_delay_ms = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(Connections::default());
        let (p, o, s, d, c) = (
            partitioned.clone(),
            open.clone(),
            stop.clone(),
            reply_delay_ms.clone(),
            connections.clone(),
        );
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                if p.load(Ordering::SeqCst) {
                    drop(client); // partitioned: the connection dies at once
                    continue;
                }
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let mut list = o.lock().unwrap();
                list.push(client.try_clone().unwrap());
                list.push(server.try_clone().unwrap());
                drop(list);
                let now = c.now.fetch_add(1, Ordering::SeqCst) + 1;
                c.max.fetch_max(now, Ordering::SeqCst);
                let (cc, sc) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(cc, sc, None, Some(c.clone()));
                pipe(server, client, Some(d.clone()), None);
            }
        });
        FaultProxy {
            addr,
            partitioned,
            open,
            stop,
            reply_delay_ms,
            connections,
        }
    }

    /// The most connections that were open through the proxy at once.
    pub fn connections_max(&self) -> usize {
        self.connections.max.load(Ordering::SeqCst)
    }

    /// Delays each piece the target sends back by `ms` (0: none), like a slow next hop.
    pub fn set_reply_delay_ms(&self, ms: u64) {
        self.reply_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Cuts every connection and refuses new ones (true), or lets them through again (false).
    pub fn partition(&self, on: bool) {
        self.partitioned.store(on, Ordering::SeqCst);
        if on {
            for s in self.open.lock().unwrap().drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.partition(true);
    }
}

fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    delay_ms: Option<Arc<AtomicU64>>,
    counted: Option<Arc<Connections>>,
) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let ms = delay_ms.as_ref().map_or(0, |d| d.load(Ordering::SeqCst));
                    if ms > 0 {
                        std::thread::sleep(Duration::from_millis(ms));
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        if let Some(c) = counted {
            c.now.fetch_sub(1, Ordering::SeqCst);
        }
    });
}
