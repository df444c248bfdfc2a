//! A small authoritative DNS server on loopback UDP, for tests of backends named by host names:
//! its records can be changed, or made to fail, while the proxy under test keeps asking.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;

#[derive(Default)]
struct Zone {
    /// Lower-case names without the trailing dot.
    records: HashMap<String, Vec<IpAddr>>,
    /// Answer every question with SERVFAIL, like a broken upstream resolver.
    failing: bool,
    queries: usize,
}

pub struct DnsServer {
    pub address: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    task: tokio::task::JoinHandle<()>,
}

impl DnsServer {
    /// Starts a server on 127.0.0.1, port 0.
    pub async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind a UDP socket on loopback");
        let address = socket.local_addr().expect("local address");
        let zone = Arc::new(Mutex::new(Zone::default()));
        let task = tokio::spawn(serve(socket, Arc::clone(&zone)));
        DnsServer {
            address,
            zone,
            task,
        }
    }

    /// Makes `name` resolve to `addresses` (none: the name exists without addresses).
    pub fn set(&self, name: &str, addresses: &[IpAddr]) {
        self.zone.lock().expect("zone").records.insert(
            name.trim_end_matches('.').to_ascii_lowercase(),
            addresses.to_vec(),
        );
    }

    /// Makes every answer a SERVFAIL, or stops doing so.
    pub fn set_failing(&self, failing: bool) {
        self.zone.lock().expect("zone").failing = failing;
    }

    /// Questions answered so far.
    pub fn queries(&self) -> usize {
        self.zone.lock().expect("zone").queries
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(socket: UdpSocket, zone: Arc<Mutex<Zone>>) {
    let mut buffer = vec![0u8; 4096];
    loop {
        let Ok((length, peer)) = socket.recv_from(&mut buffer).await else {
            continue;
        };
        let Ok(question) = Message::from_vec(&buffer[..length]) else {
            continue;
        };
        if question.metadata.message_type != MessageType::Query {
            continue;
        }
        let reply = {
            let mut zone = zone.lock().expect("zone");
            zone.queries += 1;
            answer(&question, &zone)
        };
        if let Ok(bytes) = reply.to_vec() {
            let _ = socket.send_to(&bytes, peer).await;
        }
    }
}

fn answer(question: &Message, zone: &Zone) -> Message {
    let mut reply = Message::response(question.metadata.id, question.metadata.op_code);
    reply.metadata.recursion_desired = question.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    // The client matches the answer to its question, so the question goes back with it.
    reply.add_queries(question.queries.iter().cloned());
    let Some(query) = question.queries.first() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply;
    };
    if zone.failing || question.metadata.op_code != OpCode::Query {
        reply.metadata.response_code = ResponseCode::ServFail;
        return reply;
    }
    let name = query.name.to_lowercase().to_ascii();
    match zone.records.get(name.trim_end_matches('.')) {
        None => reply.metadata.response_code = ResponseCode::NXDomain,
        Some(addresses) => {
            for address in addresses {
                let data = match (query.query_type, address) {
                    (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
                    (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                // TTL 0: the proxy's resolve_interval alone decides when to ask again.
                reply.add_answer(Record::from_rdata(query.name.clone(), 0, data));
            }
        }
    }
    reply
}
