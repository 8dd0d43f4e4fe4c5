//! Milters for tests: a real rspamd (its proxy worker in milter mode, scanning itself, with the
//! modules that would ask the network switched off) and a real OpenDKIM (signing with a key
//! made here), each started in a directory of its own on loopback; and [`FakeMilter`], a
//! milter on a unix socket that misbehaves on purpose (hangs, closes mid-body) or answers a
//! set way (quarantine, a header).

use crate::{free_addr, have, wait_until};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// The GTUBE string, assembled at run time: rspamd rejects any message that carries it.
pub fn gtube() -> String {
    [
        "XJS*C4JDBQADN1.NSBN3*2IDNEN*",
        "GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X",
    ]
    .concat()
}

fn listening(addr: SocketAddr, secs: u64) -> bool {
    wait_until(secs, || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    })
}

/// A process stopped when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A subject [`Rspamd`] scores 12, above its quarantine threshold (10), below reject (50).
pub const QUARANTINED_SUBJECT: &str = "win a prize";

/// rspamd in milter mode on a loopback port.
pub struct Rspamd {
    _process: Running,
    /// Its milter socket (`inet:`).
    pub addr: SocketAddr,
    /// Its directory: config, log, databases.
    pub dir: PathBuf,
}

impl Rspamd {
    /// Starts rspamd in `dir`; waits until its milter port answers.
    pub fn start(dir: &Path) -> Rspamd {
        assert!(
            have("rspamd"),
            "rspamd is required (apt-get install rspamd)"
        );
        let addr = free_addr();
        let local = dir.join("local.d");
        std::fs::create_dir_all(&local).unwrap();
        std::fs::write(
            dir.join("rspamd.conf"),
            format!(
                r#".include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "info";
}}
worker "rspamd_proxy" {{
    bind_socket = "{addr}";
    milter = yes;
    timeout = 120s;
    count = 1;
    upstream "local" {{
        default = yes;
        self_scan = yes;
    }}
}}
"#
            ),
        )
        .unwrap();
        // No network here: a resolver that answers nothing, at once.
        std::fs::write(
            local.join("options.inc"),
            "dns { nameserver = [\"127.0.0.1:9\"]; timeout = 0.2s; retransmits = 1; }\nlocal_addrs = [];\n",
        )
        .unwrap();
        // The headers a clean message gets, for loopback clients too.
        std::fs::write(
            local.join("milter_headers.conf"),
            "use = [\"x-spamd-result\", \"x-rspamd-queue-id\", \"x-spam-status\"];\nskip_local = false;\nskip_authenticated = false;\n",
        )
        .unwrap();
        // Quarantine above 10 (reject stays for GTUBE): a subject worth 12 lands there.
        std::fs::write(
            local.join("actions.conf"),
            "reject = 50;\nquarantine = 10;\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("rspamd.local.lua"),
            format!(
                "config['regexp']['SPOOLPAIR_TEST_SPAMMY'] = {{ re = 'Subject=/{QUARANTINED_SUBJECT}/i', score = 12.0, description = 'scores above the quarantine threshold' }}\n"
            ),
        )
        .unwrap();
        for module in [
            "rbl",
            "fuzzy_check",
            "asn",
            "neural",
            "dkim_signing",
            "arc",
            "spf",
            "dmarc",
            "dkim",
            "phishing",
            "url_redirector",
            "multimap",
            "emails",
            "replies",
            "ratelimit",
            "greylist",
        ] {
            std::fs::write(local.join(format!("{module}.conf")), "enabled = false;\n").unwrap();
        }
        let log = std::fs::File::create(dir.join("stdout.log")).unwrap();
        let var = |k: &str, v: &Path| format!("--var={k}={}", v.display());
        let child = Command::new("rspamd")
            .args(["-f", "-i", "-c"])
            .arg(dir.join("rspamd.conf"))
            .arg(var("RUNDIR", dir))
            .arg(var("LOGDIR", dir))
            .arg(var("DBDIR", dir))
            .arg(var("LOCAL_CONFDIR", dir))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let r = Rspamd {
            _process: Running(child),
            addr,
            dir: dir.to_path_buf(),
        };
        assert!(
            listening(addr, 60),
            "rspamd did not listen: {}",
            std::fs::read_to_string(dir.join("rspamd.log")).unwrap_or_default()
        );
        r
    }
}

/// OpenDKIM signing for `example.com` (selector `test`) on a loopback port, with the `simple`
/// canonicalization: a header field the MTA handed over with other bytes than it spools (a
/// folded line's end, the space after the colon) breaks the signature.
pub struct OpenDkim {
    _process: Running,
    /// Its milter socket (`inet:`).
    pub addr: SocketAddr,
    /// The public key as `opendkim-genkey` wrote its DNS record.
    pub public_record: PathBuf,
}

impl OpenDkim {
    /// Makes a key in `dir` and starts opendkim; waits until its port answers.
    pub fn start(dir: &Path) -> OpenDkim {
        assert!(
            have("opendkim") && have("opendkim-genkey"),
            "opendkim and opendkim-genkey are required (apt-get install opendkim opendkim-tools)"
        );
        let made = Command::new("opendkim-genkey")
            .arg("-D")
            .arg(dir)
            .args(["-d", "example.com", "-s", "test"])
            .status()
            .unwrap();
        assert!(made.success(), "opendkim-genkey failed");
        let addr = free_addr();
        let conf = dir.join("opendkim.conf");
        std::fs::write(
            &conf,
            format!(
                "Syslog no\nBackground no\nSocket inet:{}@{}\nDomain example.com\nSelector test\nKeyFile {}\n\
                 Canonicalization simple/simple\nMode sv\nPidFile {}\nRequireSafeKeys no\n",
                addr.port(),
                addr.ip(),
                dir.join("test.private").display(),
                dir.join("opendkim.pid").display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("opendkim.log")).unwrap();
        let child = Command::new("opendkim")
            .args(["-f", "-x"])
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let o = OpenDkim {
            _process: Running(child),
            addr,
            public_record: dir.join("test.txt"),
        };
        assert!(
            listening(addr, 20),
            "opendkim did not listen: {}",
            std::fs::read_to_string(dir.join("opendkim.log")).unwrap_or_default()
        );
        o
    }

    /// Whether `message` carries a DKIM-Signature that verifies against this key (dkimpy, no
    /// DNS: `tests/peers/dkim_verify.py`).
    pub fn verifies(&self, message: &[u8]) -> bool {
        let out = crate::run_with_stdin(
            Command::new("python3")
                .arg(crate::workspace_root().join("tests/peers/dkim_verify.py"))
                .arg(&self.public_record),
            message,
        );
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            said == "pass" || said == "fail",
            "dkim_verify.py: {said} {} (pip install dkimpy)",
            String::from_utf8_lossy(&out.stderr)
        );
        said == "pass"
    }
}

/// How a [`FakeMilter`] behaves.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// Continues at every step; adds `X-Fake-Milter: seen` at the end.
    AddHeader,
    /// Never answers the end of the message.
    HangAtEnd,
    /// Closes the connection at the first body packet.
    CloseMidBody,
    /// Asks for no replies to body packets (`SMFIP_NR_BODY`), then stops reading at the
    /// first one, the connection left open: the MTA's writes are what must time out.
    StallMidBody,
    /// Quarantines every message, reason `fake score 20`.
    Quarantine,
    /// Discards every message.
    Discard,
    /// Changes the envelope (sender `new@example.com`, `carol@example.org` added,
    /// `bob@example.org` removed) and the Subject (`rewritten`).
    Rewrite,
}

/// A milter on a unix socket, one thread per connection.
pub struct FakeMilter {
    /// Its socket.
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

fn packet(code: u8, data: &[u8]) -> Vec<u8> {
    let mut p = ((data.len() + 1) as u32).to_be_bytes().to_vec();
    p.push(code);
    p.extend_from_slice(data);
    p
}

fn serve(mut s: UnixStream, behaviour: Behaviour) {
    loop {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let mut data = vec![0u8; u32::from_be_bytes(len) as usize];
        if s.read_exact(&mut data).is_err() || data.is_empty() {
            return;
        }
        let reply: Vec<u8> = match (data[0], behaviour) {
            (b'O', _) => {
                let mut d = 6u32.to_be_bytes().to_vec();
                // Add and change headers, add and remove recipients, quarantine, change sender.
                d.extend_from_slice(&0x7Du32.to_be_bytes());
                let steps: u32 = match behaviour {
                    Behaviour::StallMidBody => 0x80000, // no reply to body packets
                    _ => 0,
                };
                d.extend_from_slice(&steps.to_be_bytes());
                packet(b'O', &d)
            }
            (b'D' | b'A', _) => continue,
            (b'Q', _) => return,
            (b'B', Behaviour::CloseMidBody) => return,
            (b'B', Behaviour::StallMidBody) => {
                std::thread::sleep(Duration::from_secs(300));
                return;
            }
            (b'E', Behaviour::HangAtEnd) => {
                std::thread::sleep(Duration::from_secs(300));
                return;
            }
            (b'E', Behaviour::AddHeader) => {
                let mut r = packet(b'h', b"X-Fake-Milter\0seen\0");
                r.extend(packet(b'c', b""));
                r
            }
            (b'E', Behaviour::Discard) => packet(b'd', b""),
            (b'E', Behaviour::Rewrite) => {
                let mut r = packet(b'e', b"<new@example.com>\0");
                r.extend(packet(b'+', b"<carol@example.org>\0"));
                r.extend(packet(b'-', b"<bob@example.org>\0"));
                r.extend(packet(b'm', b"\0\0\0\x01Subject\0rewritten\0"));
                r.extend(packet(b'c', b""));
                r
            }
            (b'E', Behaviour::Quarantine) => {
                let mut r = packet(b'q', b"fake score 20\0");
                r.extend(packet(b'c', b""));
                r
            }
            _ => packet(b'c', b""),
        };
        if s.write_all(&reply).is_err() {
            return;
        }
    }
}

impl FakeMilter {
    /// Listens on a new socket.
    pub fn start(behaviour: Behaviour) -> FakeMilter {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("milter.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                std::thread::spawn(move || serve(s, behaviour));
            }
        });
        FakeMilter { socket, _dir: dir }
    }

    /// The `[[filter.milter]]` entry for it.
    pub fn config(&self, name: &str, extra: &str) -> String {
        format!(
            "[[filter.milter]]\nname = \"{name}\"\nsocket = \"unix:{}\"\n{extra}\n",
            self.socket.display()
        )
    }
}
