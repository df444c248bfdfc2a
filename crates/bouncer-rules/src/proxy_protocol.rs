//! The PROXY protocol header (versions 1 and 2), with which a load balancer in front tells us the
//! client's real address. Only the address matters here; TLVs of version 2 are skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A version 1 header is at most 107 bytes; a version 2 header's length field allows more, but
/// this proxy bounds what it accepts.
pub const MAX_HEADER_BYTES: usize = 536;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A parsed header: the client's address (none for `LOCAL` or `UNKNOWN`) and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    pub source: Option<SocketAddr>,
    pub length: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("more bytes are needed to read the PROXY header")]
    Incomplete,
    #[error("the connection does not start with a valid PROXY protocol header")]
    Invalid,
}

/// Parses the header at the start of `bytes`.
pub fn parse_proxy_header(bytes: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    if bytes.len() < V2_SIGNATURE.len() {
        let prefix_of_either =
            V2_SIGNATURE.starts_with(bytes) || b"PROXY ".starts_with(&bytes[..bytes.len().min(6)]);
        return Err(if prefix_of_either {
            ProxyHeaderError::Incomplete
        } else {
            ProxyHeaderError::Invalid
        });
    }
    if bytes.starts_with(V2_SIGNATURE) {
        parse_v2(bytes)
    } else if bytes.starts_with(b"PROXY ") {
        parse_v1(bytes)
    } else {
        Err(ProxyHeaderError::Invalid)
    }
}

fn parse_v1(bytes: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    const MAX_V1: usize = 107;
    let window = &bytes[..bytes.len().min(MAX_V1)];
    let Some(end) = window.windows(2).position(|pair| pair == b"\r\n") else {
        return Err(if bytes.len() >= MAX_V1 {
            ProxyHeaderError::Invalid
        } else {
            ProxyHeaderError::Incomplete
        });
    };
    let line = std::str::from_utf8(&window[..end]).map_err(|_| ProxyHeaderError::Invalid)?;
    let fields: Vec<&str> = line.split(' ').collect();
    let length = end + 2;
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(ProxyHeader {
            source: None,
            length,
        }),
        [
            "PROXY",
            family @ ("TCP4" | "TCP6"),
            source,
            _destination,
            source_port,
            _destination_port,
        ] => {
            let ip: IpAddr = source.parse().map_err(|_| ProxyHeaderError::Invalid)?;
            if (*family == "TCP4") != ip.is_ipv4() {
                return Err(ProxyHeaderError::Invalid);
            }
            let port: u16 = source_port.parse().map_err(|_| ProxyHeaderError::Invalid)?;
            Ok(ProxyHeader {
                source: Some(SocketAddr::new(ip, port)),
                length,
            })
        }
        _ => Err(ProxyHeaderError::Invalid),
    }
}

fn parse_v2(bytes: &[u8]) -> Result<ProxyHeader, ProxyHeaderError> {
    if bytes.len() < 16 {
        return Err(ProxyHeaderError::Incomplete);
    }
    let version_command = bytes[12];
    if version_command >> 4 != 2 {
        return Err(ProxyHeaderError::Invalid);
    }
    let family = bytes[13];
    let payload = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let length = 16 + payload;
    if length > MAX_HEADER_BYTES {
        return Err(ProxyHeaderError::Invalid);
    }
    if bytes.len() < length {
        return Err(ProxyHeaderError::Incomplete);
    }
    let body = &bytes[16..length];
    let source = match (version_command & 0x0f, family >> 4) {
        // LOCAL: a health check from the balancer itself; the socket peer is the truth.
        (0x0, _) => None,
        (0x1, 0x1) => {
            let address = body.get(..12).ok_or(ProxyHeaderError::Invalid)?;
            let ip = Ipv4Addr::new(address[0], address[1], address[2], address[3]);
            Some(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([address[8], address[9]]),
            ))
        }
        (0x1, 0x2) => {
            let address = body.get(..36).ok_or(ProxyHeaderError::Invalid)?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&address[..16]);
            let port = u16::from_be_bytes([address[32], address[33]]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        // Unix sockets and unspecified families carry no usable client address.
        (0x1, _) => None,
        _ => return Err(ProxyHeaderError::Invalid),
    };
    Ok(ProxyHeader { source, length })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_1_headers_give_the_client_address() {
        let header = parse_proxy_header(
            b"PROXY TCP4 192.0.2.1 198.51.100.2 51000 443\r\nGET / HTTP/1.1\r\n",
        )
        .expect("valid");
        assert_eq!(
            header.source,
            Some("192.0.2.1:51000".parse().expect("addr"))
        );
        assert_eq!(header.length, 45);
        let header =
            parse_proxy_header(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n").expect("valid");
        assert_eq!(
            header.source,
            Some("[2001:db8::1]:1".parse().expect("addr"))
        );
        assert_eq!(
            parse_proxy_header(b"PROXY UNKNOWN\r\n")
                .expect("valid")
                .source,
            None
        );
    }

    #[test]
    fn version_1_problems_are_told_apart() {
        assert_eq!(
            parse_proxy_header(b"PROXY TCP4 192.0.2.1"),
            Err(ProxyHeaderError::Incomplete)
        );
        assert_eq!(
            parse_proxy_header(b"PRO"),
            Err(ProxyHeaderError::Incomplete)
        );
        assert_eq!(
            parse_proxy_header(b"GET / HTTP/1.1\r\n"),
            Err(ProxyHeaderError::Invalid)
        );
        assert_eq!(
            parse_proxy_header(b"PROXY TCP4 ::1 ::1 1 2\r\n"),
            Err(ProxyHeaderError::Invalid)
        );
        assert_eq!(
            parse_proxy_header(b"PROXY TCP4 1.2.3.4 1.2.3.4 99999 2\r\n"),
            Err(ProxyHeaderError::Invalid)
        );
        assert_eq!(
            parse_proxy_header(&[b'P'; 200]),
            Err(ProxyHeaderError::Invalid)
        );
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.push(0x20 | command);
        bytes.push(family);
        bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn version_2_headers_give_the_client_address() {
        let body = [
            192, 0, 2, 1, 198, 51, 100, 2, 0xc7, 0x38, 0x01, 0xbb, 0xaa, 0xbb,
        ];
        let bytes = v2(1, 0x11, &body);
        let header = parse_proxy_header(&bytes).expect("valid");
        assert_eq!(
            header.source,
            Some("192.0.2.1:51000".parse().expect("addr"))
        );
        assert_eq!(header.length, 30);

        let mut body = vec![0u8; 36];
        body[15] = 1;
        body[32] = 0;
        body[33] = 80;
        let header = parse_proxy_header(&v2(1, 0x21, &body)).expect("valid");
        assert_eq!(header.source, Some("[::1]:80".parse().expect("addr")));

        assert_eq!(
            parse_proxy_header(&v2(0, 0x00, &[])).expect("valid").source,
            None
        );
    }

    #[test]
    fn version_2_problems_are_told_apart() {
        let bytes = v2(1, 0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(
            parse_proxy_header(&bytes[..20]),
            Err(ProxyHeaderError::Incomplete)
        );
        assert_eq!(
            parse_proxy_header(&v2(1, 0x11, &[1, 2, 3])),
            Err(ProxyHeaderError::Invalid)
        );
        assert_eq!(
            parse_proxy_header(&v2(5, 0x11, &[0; 12])),
            Err(ProxyHeaderError::Invalid)
        );
        let mut huge = v2(1, 0x11, &[0; 12]);
        huge[14] = 0xff;
        assert_eq!(parse_proxy_header(&huge), Err(ProxyHeaderError::Invalid));
    }
}
