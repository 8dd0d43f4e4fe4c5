//! A real browser for the console's tests: Debian's Chromium, headless, driven through
//! ChromeDriver with the W3C WebDriver protocol (JSON over HTTP on loopback).
//!
//! Hand-written: the tests need a dozen commands (navigate, find, type, click, read, run a
//! script, cookies, screenshots, the browser's console log). The client crates (`fantoccini`,
//! `thirtyfour`) bring an async HTTP stack of their own for that; a blocking request per
//! command over a `TcpStream` is all a test needs.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The element key of the W3C protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A ChromeDriver process and one browser session.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

/// An element of the current page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Value {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut s = TcpStream::connect(addr).expect("chromedriver");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Read the head, then exactly the body its Content-Length gives (ChromeDriver may keep
    // the connection open whatever the request said).
    let mut resp = Vec::new();
    let mut buf = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut buf).expect("chromedriver answer");
        assert!(n > 0, "chromedriver closed before answering {path}");
        resp.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&resp[..head_end]).to_ascii_lowercase();
    let body = if let Some(len) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        while resp.len() < head_end + len {
            let n = s.read(&mut buf).expect("chromedriver answer");
            assert!(n > 0, "chromedriver closed mid-answer to {path}");
            resp.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&resp[head_end..head_end + len]).to_string()
    } else {
        s.read_to_end(&mut resp).expect("chromedriver answer");
        let rest = String::from_utf8_lossy(&resp[head_end..]).to_string();
        if head.contains("transfer-encoding: chunked") {
            dechunk(&rest)
        } else {
            rest
        }
    };
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("chromedriver {path}: {e}: {body}"))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

impl Browser {
    /// Starts ChromeDriver and a headless Chromium that accepts the console's self-signed
    /// certificate. Panics, naming the package, when either is missing.
    pub fn start() -> Browser {
        for (bin, package) in [
            ("/usr/bin/chromium", "chromium"),
            ("/usr/bin/chromedriver", "chromium-driver"),
        ] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: install Debian's {package} (scripts/test does)"
            );
        }
        let addr = crate::free_addr();
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={}", addr.port()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1280,900", "--no-first-run", "--disable-extensions",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        }}});
        let v = request(addr, "POST", "/session", Some(&caps));
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {v}"))
            .to_string();
        Browser {
            driver,
            addr,
            session,
            _profile: profile,
        }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let v = request(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body.as_ref(),
        );
        if let Some(err) = v["value"]["error"].as_str() {
            panic!("webdriver {path}: {err}: {}", v["value"]["message"]);
        }
        v["value"].clone()
    }

    /// Opens `url` and waits for the page to load.
    pub fn go(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    /// The current page's URL.
    pub fn url(&self) -> String {
        self.cmd("GET", "/url", None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The current page's title.
    pub fn title(&self) -> String {
        self.cmd("GET", "/title", None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The current page's markup as the browser holds it.
    pub fn source(&self) -> String {
        self.cmd("GET", "/source", None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The text of the page's body as a person sees it (read by a script, so a page that is
    /// being replaced gives its text or the next one's, never a stale element).
    pub fn text(&self) -> String {
        self.run("return document.body ? document.body.innerText : ''")
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The page's text once it contains `needle` (a form's answer may still be loading when a
    /// click returns); after 10 s whatever it is.
    pub fn wait_text(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let t = self.text();
            if t.contains(needle) || Instant::now() > deadline {
                return t;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first element `css` selects; panics when there is none.
    pub fn find(&self, css: &str) -> Element<'_> {
        self.try_find(css)
            .unwrap_or_else(|| panic!("no element {css} on {}: {}", self.url(), self.text()))
    }

    /// The first element `css` selects, if any.
    pub fn try_find(&self, css: &str) -> Option<Element<'_>> {
        let v = request(
            self.addr,
            "POST",
            &format!("/session/{}/element", self.session),
            Some(&json!({"using": "css selector", "value": css})),
        );
        v["value"][ELEMENT].as_str().map(|id| Element {
            browser: self,
            id: id.to_string(),
        })
    }

    /// Every element `css` selects.
    pub fn find_all(&self, css: &str) -> Vec<Element<'_>> {
        self.cmd(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e[ELEMENT].as_str())
        .map(|id| Element {
            browser: self,
            id: id.to_string(),
        })
        .collect()
    }

    /// Runs `script` in the page (a function body; `return` gives the value).
    pub fn run(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
    }

    /// The value of the cookie `name`.
    pub fn cookie(&self, name: &str) -> Option<String> {
        let v = request(
            self.addr,
            "GET",
            &format!("/session/{}/cookie/{name}", self.session),
            None,
        );
        v["value"]["value"].as_str().map(str::to_string)
    }

    /// Every cookie, as the browser keeps them (name, flags).
    pub fn cookies(&self) -> Value {
        self.cmd("GET", "/cookie", None)
    }

    /// The browser's console log since the last call (messages and CSP reports).
    pub fn console_log(&self) -> Vec<String> {
        self.cmd("POST", "/se/log", Some(json!({"type": "browser"})))
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|e| e["message"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// Sets the window's size (a phone: 390 × 844).
    pub fn resize(&self, width: u32, height: u32) {
        self.cmd(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        );
    }

    /// Saves a PNG of the window to `path`.
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let b64 = self.cmd("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or(""))
            .unwrap();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}

impl Element<'_> {
    fn path(&self, what: &str) -> String {
        format!("/element/{}{what}", self.id)
    }

    /// Types `text` into it.
    pub fn type_text(&self, text: &str) -> &Self {
        self.browser
            .cmd("POST", &self.path("/value"), Some(json!({ "text": text })));
        self
    }

    /// Clears a text field.
    pub fn clear(&self) -> &Self {
        self.browser
            .cmd("POST", &self.path("/clear"), Some(json!({})));
        self
    }

    /// Clicks it.
    pub fn click(&self) {
        self.browser
            .cmd("POST", &self.path("/click"), Some(json!({})));
    }

    /// Clicks a button or link that loads another page, and returns once that page has
    /// loaded (the document is marked before the click; the next one has no mark). A click
    /// alone may return before the browser has even sent the form on a busy machine.
    pub fn click_to_next_page(&self) {
        self.browser.run("window.__spoolpair_old_page = true");
        self.click();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.browser.run(
                "return window.__spoolpair_old_page !== true && document.readyState === 'complete'",
            );
            if v == Value::Bool(true) {
                return;
            }
            assert!(Instant::now() < deadline, "the next page did not load");
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    /// Its visible text.
    pub fn text(&self) -> String {
        self.browser
            .cmd("GET", &self.path("/text"), None)
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Its attribute `name`.
    pub fn attr(&self, name: &str) -> Option<String> {
        self.browser
            .cmd("GET", &self.path(&format!("/attribute/{name}")), None)
            .as_str()
            .map(str::to_string)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            request(
                self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                None,
            )
        });
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
