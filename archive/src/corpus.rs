//! Sample mail for tests (the archive's own and the real-process ones): messages that MIME
//! parsers and byte-exact storage trip over. Not a generator of load (that is in `bench`).

/// A plain message with the usual headers.
pub const PLAIN: &[u8] = b"From: Alice Example <alice@example.com>\r\nTo: bob@example.net\r\nSubject: Quarterly report\r\nMessage-ID: <q1@example.com>\r\n\r\nThe numbers are in. Revenue grew.\r\n";

/// Mail that parsers and byte-exact storage trip over, each with what it is: 8-bit text, long
/// lines, nested multiparts with base64 and quoted-printable attachments, broken MIME.
pub fn awkward() -> Vec<(&'static str, Vec<u8>)> {
    let long_line = format!(
        "From: a@example.com\r\nSubject: long\r\n\r\n{}\r\n",
        "x".repeat(20_000)
    );
    vec![
        ("plain", PLAIN.to_vec()),
        (
            "8bit",
            "From: zoë@example.com\r\nSubject: Grüße aus Köln\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nSchöne Grüße, Ærøskøbing \u{1F600}\r\n"
                .as_bytes()
                .to_vec(),
        ),
        ("long lines", long_line.into_bytes()),
        (
            "nested multipart with base64 and quoted-printable attachments",
            b"From: carol@example.org\r\nTo: dave@example.org\r\nSubject: Invoice attached\r\nMessage-ID: <inv-7@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n--inner\r\nContent-Type: text/plain\r\n\r\nPlease find the invoice.\r\n--inner\r\nContent-Type: text/html\r\n\r\n<html><body><p>Please find the <b>zebrafish</b> invoice.</p></body></html>\r\n--inner--\r\n--outer\r\nContent-Type: application/pdf; name=\"invoice-2026.pdf\"\r\nContent-Disposition: attachment; filename=\"invoice-2026.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K\r\n--outer\r\nContent-Type: text/plain; name=\"notes.txt\"\r\nContent-Disposition: attachment; filename=\"notes.txt\"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nThe pangolin=20clause applies=\r\n here.\r\n--outer--\r\n"
                .to_vec(),
        ),
        (
            "broken MIME",
            b"From: eve@example.com\r\nSubject: broken\r\nContent-Type: multipart/mixed; boundary=\"never\"\r\nContent-Transfer-Encoding: base64\r\n\r\n--nope\r\n!!!not base64 at all\xff\xfe\r\n"
                .to_vec(),
        ),
        ("no headers at all", b"just a line without a header block\r\n".to_vec()),
    ]
}
