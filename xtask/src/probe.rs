//! Tiny std-only clients (HTTP/1.1, RESP, NTP): enough for readiness and smoke checks, so that
//! xtask needs neither a tokio stack nor client crates of its own.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::Result;

fn connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// One HTTP/1.1 request with `Connection: close`; returns the status code and the body.
pub(crate) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>)> {
    http_with(addr, method, path, &[], body, timeout)
}

/// [`http`] with extra request headers (Consul's `X-Consul-Token`, say).
pub(crate) fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, Vec<u8>)> {
    let mut stream = connect(addr, timeout)?;
    stream.write_all(request_head(addr, method, path, headers, body.len()).as_bytes())?;
    stream.write_all(body)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    parse_http_response(&response)
}

fn request_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body_len: usize,
) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {body_len}\r\n\r\n"));
    head
}

fn parse_http_response(response: &[u8]) -> Result<(u16, Vec<u8>)> {
    let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") else {
        bail!("truncated HTTP response ({} bytes)", response.len());
    };
    let head = String::from_utf8_lossy(&response[..split]);
    let body = &response[split + 4..];
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let Some(status) = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
    else {
        bail!("bad HTTP status line {status_line:?}");
    };
    let chunked = lines.any(|line| {
        let line = line.to_ascii_lowercase();
        line.starts_with("transfer-encoding:") && line.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            bail!("truncated chunked body");
        };
        let size_field = String::from_utf8_lossy(&data[..eol]);
        let size_hex = size_field.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// A Redis reply, as far as the checks need one.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Resp {
    Simple(String),
    Bulk(Option<Vec<u8>>),
    Integer(i64),
}

/// A Redis connection speaking raw RESP2. Its errors name the server: one of a cluster's
/// nodes, say.
pub(crate) struct Redis {
    reader: BufReader<TcpStream>,
    addr: SocketAddr,
}

impl Redis {
    pub(crate) fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let stream = connect(addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
        Ok(Self {
            reader: BufReader::new(stream),
            addr,
        })
    }

    pub(crate) fn cmd(&mut self, args: &[&[u8]]) -> Result<Resp> {
        let addr = self.addr;
        self.try_cmd(args)?
            .map_err(|e| format!("{addr}: redis error: {e}").into())
    }

    /// A command whose error reply (`MOVED …`, say) the caller handles: the outer error is the
    /// connection's, the inner one the server's reply.
    pub(crate) fn try_cmd(&mut self, args: &[&[u8]]) -> Result<Result<Resp, String>> {
        let addr = self.addr;
        self.exchange(args)
            .map_err(|e| format!("{addr}: {e}").into())
    }

    fn exchange(&mut self, args: &[&[u8]]) -> Result<Result<Resp, String>> {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        self.reader.get_mut().write_all(&request)?;
        let line = self.line()?;
        let (kind, rest) = line.split_at(1.min(line.len()));
        let reply = match kind {
            "+" => Resp::Simple(rest.to_string()),
            ":" => Resp::Integer(rest.parse()?),
            "-" => return Ok(Err(rest.to_string())),
            "$" => {
                let len: i64 = rest.parse()?;
                if len < 0 {
                    return Ok(Ok(Resp::Bulk(None)));
                }
                let mut data = vec![0; usize::try_from(len)? + 2];
                self.reader.read_exact(&mut data)?;
                data.truncate(data.len() - 2);
                Resp::Bulk(Some(data))
            }
            _ => bail!("unexpected redis reply {line:?}"),
        };
        Ok(Ok(reply))
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("redis closed the connection");
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
}

/// Seconds from the NTP era-0 epoch (1900) to the Unix epoch.
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

fn to_ntp(time: SystemTime) -> u64 {
    let since_unix = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = (since_unix.as_secs() + NTP_UNIX_OFFSET) & 0xffff_ffff;
    let frac = (u64::from(since_unix.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

/// Seconds since the Unix epoch (may be negative), as f64, of an NTP timestamp.
fn ntp_to_unix_f64(ts: u64) -> f64 {
    let mut secs = ts >> 32;
    // Era pivot: timestamps below 2^31 are taken to be after 2036 (era 1).
    if secs < 1 << 31 {
        secs += 1 << 32;
    }
    let frac = (ts & 0xffff_ffff) as f64 / 4_294_967_296.0;
    secs as f64 - NTP_UNIX_OFFSET as f64 + frac
}

fn unix_f64(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What an NTP server said, already checked to be a well-formed server reply to our query.
#[derive(Debug)]
pub(crate) struct NtpReply {
    pub(crate) leap: u8,
    pub(crate) stratum: u8,
    /// The server's transmit time, seconds since the Unix epoch.
    pub(crate) transmit: f64,
    /// Server clock minus ours, seconds: ((T2−T1)+(T3−T4))/2.
    pub(crate) offset: f64,
    pub(crate) round_trip: f64,
}

impl NtpReply {
    /// A server that a client would accept as a time source.
    pub(crate) fn check_synchronised(&self) -> Result<()> {
        if self.leap == 3 {
            bail!("leap indicator 3 (clock not synchronised)");
        }
        if !(1..=15).contains(&self.stratum) {
            bail!("stratum {}", self.stratum);
        }
        Ok(())
    }
}

/// One SNTP client exchange (RFC 4330): a 48-byte mode-3 query, one mode-4 reply.
pub(crate) fn ntp_query(addr: SocketAddr, timeout: Duration) -> Result<NtpReply> {
    let socket = UdpSocket::bind(("127.0.0.1", 0))?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(timeout))?;
    let mut query = [0u8; 48];
    query[0] = 4 << 3 | 3; // LI 0, version 4, mode 3 (client)
    let t1 = SystemTime::now();
    let t1_ntp = to_ntp(t1);
    query[40..48].copy_from_slice(&t1_ntp.to_be_bytes());
    socket.send(&query)?;
    let mut buf = [0u8; 512];
    let len = socket.recv(&mut buf)?;
    let t4 = SystemTime::now();
    parse_ntp_reply(&buf[..len], t1_ntp, unix_f64(t1), unix_f64(t4))
}

fn parse_ntp_reply(reply: &[u8], t1_ntp: u64, t1: f64, t4: f64) -> Result<NtpReply> {
    if reply.len() < 48 {
        bail!("short NTP reply ({} bytes)", reply.len());
    }
    let ts = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&reply[at..at + 8]);
        u64::from_be_bytes(bytes)
    };
    let (leap, mode, stratum) = (reply[0] >> 6, reply[0] & 7, reply[1]);
    if mode != 4 {
        bail!("NTP reply has mode {mode}, not 4 (server)");
    }
    if stratum == 0 {
        let code = String::from_utf8_lossy(&reply[12..16]);
        bail!("NTP kiss-of-death {code:?}");
    }
    if ts(24) != t1_ntp {
        bail!("NTP reply does not echo our transmit time (not a reply to our query)");
    }
    let (t2, t3) = (ntp_to_unix_f64(ts(32)), ntp_to_unix_f64(ts(40)));
    Ok(NtpReply {
        leap,
        stratum,
        transmit: t3,
        offset: ((t2 - t1) + (t3 - t4)) / 2.0,
        round_trip: (t4 - t1) - (t3 - t2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ntp_timestamps_round_trip() {
        let now = SystemTime::now();
        let back = ntp_to_unix_f64(to_ntp(now));
        assert!((back - unix_f64(now)).abs() < 1e-6);
    }

    #[test]
    fn ntp_reply_is_checked() {
        let t1_ntp = to_ntp(SystemTime::now());
        let t1 = ntp_to_unix_f64(t1_ntp);
        let mut reply = [0u8; 48];
        reply[0] = 4 << 3 | 4;
        reply[1] = 8;
        reply[24..32].copy_from_slice(&t1_ntp.to_be_bytes());
        reply[32..40].copy_from_slice(&t1_ntp.to_be_bytes());
        reply[40..48].copy_from_slice(&t1_ntp.to_be_bytes());
        let ok = parse_ntp_reply(&reply, t1_ntp, t1, t1).unwrap();
        assert_eq!(ok.stratum, 8);
        assert!(ok.offset.abs() < 1e-6);
        ok.check_synchronised().unwrap();

        reply[0] = 3 << 6 | 4 << 3 | 4;
        let unsync = parse_ntp_reply(&reply, t1_ntp, t1, t1).unwrap();
        assert!(unsync.check_synchronised().is_err());

        reply[1] = 0;
        assert!(parse_ntp_reply(&reply, t1_ntp, t1, t1).is_err());
        reply[1] = 8;
        assert!(parse_ntp_reply(&reply, t1_ntp + 1, t1, t1).is_err());
        assert!(parse_ntp_reply(&reply[..40], t1_ntp, t1, t1).is_err());
    }

    #[test]
    fn http_requests_carry_extra_headers() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 18510));
        assert_eq!(
            request_head(addr, "GET", "/v1/status/leader", &[], 0),
            "GET /v1/status/leader HTTP/1.1\r\nHost: 127.0.0.1:18510\r\nConnection: close\r\n\
             Content-Length: 0\r\n\r\n"
        );
        assert_eq!(
            request_head(addr, "PUT", "/v1/kv/x", &[("X-Consul-Token", "t")], 1),
            "PUT /v1/kv/x HTTP/1.1\r\nHost: 127.0.0.1:18510\r\nConnection: close\r\n\
             X-Consul-Token: t\r\nContent-Length: 1\r\n\r\n"
        );
    }

    #[test]
    fn http_responses_parse_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ntrue";
        assert_eq!(parse_http_response(plain).unwrap(), (200, b"true".to_vec()));
        let chunked =
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(
            parse_http_response(chunked).unwrap(),
            (404, b"abcde".to_vec())
        );
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }
}
