//! A real clamd for tests, with a signature database made here (the EICAR test file's MD5 as a
//! `.hdb`; nothing downloaded), and mail that carries the EICAR file.

use crate::{have, wait_until};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The EICAR test file, assembled at run time so this source holds no signature.
pub fn eicar() -> Vec<u8> {
    [
        "X5O!P%@AP[4\\PZX54(P^)7CC)7}$",
        "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*",
    ]
    .concat()
    .into_bytes()
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A clamd started for one test, stopped when dropped.
pub struct Clamd {
    child: Option<Child>,
    /// Its directory: `clamd.sock`, the database, the log.
    pub dir: PathBuf,
}

impl Clamd {
    /// Starts clamd in `dir` with the EICAR signature only.
    pub fn start(dir: &Path) -> Clamd {
        Self::start_listening(dir, None)
    }

    /// Also listening on `tcp` (loopback) when given.
    pub fn start_listening(dir: &Path, tcp: Option<std::net::SocketAddr>) -> Clamd {
        assert!(
            have("clamd"),
            "clamd is required (apt-get install clamav-daemon)"
        );
        let db = dir.join("db");
        std::fs::create_dir_all(&db).unwrap();
        let out = crate::run_with_stdin(&mut Command::new("md5sum"), &eicar());
        let sum = String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string();
        std::fs::write(
            db.join("eicar.hdb"),
            format!("{sum}:{}:Eicar-Test-Signature\n", eicar().len()),
        )
        .unwrap();
        let conf = dir.join("clamd.conf");
        std::fs::write(
            &conf,
            format!(
                "LocalSocket {0}/clamd.sock\nDatabaseDirectory {0}/db\nForeground yes\nLogFile {0}/clamd.log\n\
                 PidFile {0}/clamd.pid\nTemporaryDirectory {0}\nScanMail yes\nUser root\n{1}",
                dir.display(),
                tcp.map(|a| format!("TCPSocket {}\nTCPAddr {}\n", a.port(), a.ip()))
                    .unwrap_or_default()
            ),
        )
        .unwrap();
        let _ = std::fs::remove_file(dir.join("clamd.sock"));
        let child = Command::new("clamd")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let sock = dir.join("clamd.sock");
        assert!(
            wait_until(60, || std::os::unix::net::UnixStream::connect(&sock)
                .is_ok()),
            "clamd did not start: {}",
            std::fs::read_to_string(dir.join("clamd.log")).unwrap_or_default()
        );
        Clamd {
            child: Some(child),
            dir: dir.to_path_buf(),
        }
    }

    /// spoold's configuration that scans with this clamd (retrying every second, 10 s per
    /// scan) and delivers to `next_hop`.
    pub fn scanning_config(&self, next_hop: std::net::SocketAddr) -> String {
        format!(
            "[delivery]\ndefault_next_hop = \"{next_hop}\"\n[filter]\nclamd = \"unix:{}\"\nretry_secs = 1\ntimeout_secs = 10\n",
            self.dir.join("clamd.sock").display()
        )
    }

    /// Stops it (mail then waits in vscan/).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.dir.join("clamd.sock"));
    }
}

impl Drop for Clamd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A message from a@example.com to b@example.org with `attachment` base64-encoded.
pub fn mime_with_attachment(subject: &str, attachment: &[u8]) -> Vec<u8> {
    format!(
        "From: a@example.com\r\nTo: b@example.org\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n--XX\r\nContent-Type: text/plain\r\n\r\n\
         see attachment\r\n--XX\r\nContent-Type: application/octet-stream; name=\"file.com\"\r\n\
         Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"file.com\"\r\n\r\n\
         {}\r\n--XX--\r\n",
        base64(attachment)
    )
    .into_bytes()
}
