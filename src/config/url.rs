//! Upstream URLs: `ws://` or `wss://`, a host name or IP, a port 1–65535, nothing else.

use std::fmt;
use std::str::FromStr;

use hyper::Uri;

/// A validated upstream URL: `ws://` or `wss://`, a host, and no path beyond `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// True for `wss://`.
    pub secure: bool,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port, defaulted from the scheme.
    pub port: u16,
}

impl UpstreamUrl {
    /// `host:port` with IPv6 literals bracketed, for `Host`-style use and logs.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for UpstreamUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let uri: Uri = s.parse().map_err(|e| format!("`{s}` is not a URL ({e})"))?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(format!("`{s}`: the scheme must be ws:// or wss://")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{s}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("`{s}`: credentials in the URL are not supported"));
        }
        // `http::Uri` accepts more than a host (brackets anywhere, `,`, `!`) and reads a
        // port that is not a number as no port at all: check both here, so that a typo
        // is an error instead of a dial to port 80, and `wsbeat check` prints a URL that
        // reads back.
        let raw_host = authority.host();
        let host = match raw_host.strip_prefix('[') {
            Some(bracketed) => bracketed
                .strip_suffix(']')
                .filter(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
                .ok_or_else(|| format!("`{s}`: `{raw_host}` is not an IPv6 address"))?,
            None => raw_host,
        };
        if host.is_empty() {
            return Err(format!("`{s}` has no host"));
        }
        let name_chars = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        if !raw_host.starts_with('[') && !host.bytes().all(name_chars) {
            return Err(format!("`{s}`: `{host}` is not a host name or IP address"));
        }
        let port = match authority.as_str().strip_prefix(raw_host) {
            Some("") => {
                if secure {
                    443
                } else {
                    80
                }
            }
            after_host => after_host
                .and_then(|rest| rest.strip_prefix(':'))
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("`{s}`: the port must be a number from 1 to 65535"))?,
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(format!(
                "`{s}`: an upstream URL has no path or query (the client's path and query are forwarded)"
            ));
        }
        Ok(UpstreamUrl {
            secure,
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.secure { "wss" } else { "ws" };
        // Written in place, not through `authority()`'s string.
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}
