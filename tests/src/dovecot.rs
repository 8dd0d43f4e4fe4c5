//! A Dovecot IMAP server of a test's (or a benchmark's) own, for imports from IMAP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// A Dovecot of the test's own (configuration, log and a mail user's Maildir under a temporary
/// directory; IMAPS and IMAP+STARTTLS on free ports; a self-signed certificate for
/// `localhost`). Stopped when dropped.
pub struct Dovecot {
    conf: std::path::PathBuf,
    /// The IMAPS port.
    pub imaps: u16,
    /// The IMAP (STARTTLS) port.
    pub imap: u16,
    maildir: std::path::PathBuf,
    /// The server's certificate (PEM), to trust.
    pub cert: std::path::PathBuf,
    /// A file holding the mail user `arch`'s password.
    pub password_file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Dovecot {
    /// Starts it; panics naming what is missing.
    pub fn start() -> Dovecot {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let (cert, key) = crate::write_self_signed(&d);
        let maildir = d.join("home/arch/Maildir");
        for sub in ["cur", "new", "tmp"] {
            std::fs::create_dir_all(maildir.join(sub)).unwrap();
        }
        std::fs::write(d.join("passwd"), "arch:{PLAIN}s3cret-imap\n").unwrap();
        let password_file = d.join("imap.password");
        std::fs::write(&password_file, "s3cret-imap\n").unwrap();
        let (imaps, imap) = (crate::free_addr().port(), crate::free_addr().port());
        let conf = d.join("dovecot.conf");
        std::fs::create_dir_all(d.join("run")).unwrap();
        std::fs::write(
            &conf,
            format!(
                "base_dir = {d}/run\nlog_path = {d}/dovecot.log\nprotocols = imap\nlisten = 127.0.0.1\n\
                 ssl = required\nssl_cert = <{cert}\nssl_key = <{key}\ndisable_plaintext_auth = yes\n\
                 auth_mechanisms = plain\npassdb {{\n  driver = passwd-file\n  args = scheme=PLAIN {d}/passwd\n}}\n\
                 userdb {{\n  driver = static\n  args = uid=nobody gid=nogroup home={d}/home/%u\n}}\n\
                 mail_location = maildir:~/Maildir\nfirst_valid_uid = 1\n\
                 service imap-login {{\n  inet_listener imap {{\n    port = {imap}\n  }}\n  inet_listener imaps {{\n    port = {imaps}\n  }}\n}}\n",
                d = d.display(),
                cert = cert.display(),
                key = key.display(),
            ),
        )
        .unwrap();
        // Its master daemonizes and would keep an output pipe open: no pipes.
        let started = std::process::Command::new("dovecot")
            .arg("-c")
            .arg(&conf)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("dovecot is required (apt-get install dovecot-imapd)");
        let dv = Dovecot {
            conf,
            imaps,
            imap,
            maildir,
            cert,
            password_file,
            _dir: dir,
        };
        assert!(
            crate::wait_until(20, || std::net::TcpStream::connect(("127.0.0.1", imaps))
                .is_ok()),
            "dovecot did not listen ({started}):\n{}",
            std::fs::read_to_string(d.join("dovecot.log")).unwrap_or_default()
        );
        dv
    }

    /// Delivers `raw` into the Maildir as Dovecot's own delivery would (tmp, then new/).
    pub fn deliver(&self, n: usize, raw: &[u8]) {
        self.deliver_all(n, &[raw.to_vec()]);
    }

    /// Delivers messages numbered from `first` (one ownership change for all).
    pub fn deliver_all(&self, first: usize, messages: &[Vec<u8>]) {
        for (i, raw) in messages.iter().enumerate() {
            let n = first + i;
            let name = format!("{}.M{n}.test", 1_700_000_000 + n);
            let tmp = self.maildir.join("tmp").join(&name);
            std::fs::write(&tmp, raw).unwrap();
            std::fs::rename(&tmp, self.maildir.join("new").join(&name)).unwrap();
        }
        let chown = std::process::Command::new("chown")
            .args(["-R", "nobody:nogroup"])
            .arg(self.maildir.parent().unwrap())
            .status()
            .unwrap();
        assert!(chown.success());
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = std::process::Command::new("doveadm")
            .arg("-c")
            .arg(&self.conf)
            .arg("stop")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}
