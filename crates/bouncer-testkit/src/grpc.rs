//! A real gRPC server and client (tonic) for tests, with messages as raw bytes so that no code
//! generation is needed. The gRPC framing, status and trailers are tonic's own.
//!
//! | method | kind | answer |
//! |---|---|---|
//! | `Unary` | unary | the message back; `fail` gets `NOT_FOUND` with a message in the trailers |
//! | `Count` | server streaming | the message is a number `n`: `0` to `n-1`, one message each |
//! | `Sum` | client streaming | the total length of the messages received, in decimal |
//! | `Chat` | bidirectional | each message back, prefixed `echo: `, as soon as it arrives |

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes};
use futures_util::{Stream, StreamExt};
use http::HeaderMap;
use http::uri::PathAndQuery;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Status, Streaming};

/// Messages are passed as the bytes they are.
#[derive(Debug, Clone, Copy, Default)]
pub struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        BytesCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let length = src.remaining();
        Ok(Some(src.copy_to_bytes(length)))
    }
}

type MessageStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

/// A running gRPC server on loopback (cleartext HTTP/2). Dropping it stops it.
pub struct GrpcBackend {
    pub address: SocketAddr,
    calls: Arc<Mutex<Vec<GrpcCall>>>,
    stop: watch::Sender<bool>,
}

/// What the server saw of one call.
#[derive(Debug, Clone)]
pub struct GrpcCall {
    pub path: String,
    pub version: http::Version,
    pub authority: Option<String>,
    pub headers: HeaderMap,
}

impl GrpcBackend {
    pub async fn start() -> GrpcBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a gRPC backend");
        let address = listener.local_addr().expect("gRPC backend address");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(accept_loop(listener, Arc::clone(&calls), stopped));
        GrpcBackend {
            address,
            calls,
            stop,
        }
    }

    pub fn calls(&self) -> Vec<GrpcCall> {
        self.calls.lock().expect("lock").clone()
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    calls: Arc<Mutex<Vec<GrpcCall>>>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let calls = Arc::clone(&calls);
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| serve(Arc::clone(&calls), request));
            let builder = auto::Builder::new(TokioExecutor::new()).http2_only();
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = stopped.wait_for(|stop| *stop) => {}
            }
        });
    }
}

async fn serve(
    calls: Arc<Mutex<Vec<GrpcCall>>>,
    request: http::Request<Incoming>,
) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let path = request.uri().path().to_string();
    calls.lock().expect("lock").push(GrpcCall {
        path: path.clone(),
        version: request.version(),
        authority: request.uri().authority().map(ToString::to_string),
        headers: request.headers().clone(),
    });
    let mut grpc = tonic::server::Grpc::new(BytesCodec);
    let response = match path.as_str() {
        "/bouncer.test.Echo/Unary" => {
            let method = tower::service_fn(|request: tonic::Request<Bytes>| async move {
                let message = request.into_inner();
                if message.as_ref() == b"fail" {
                    Err(Status::not_found("no such thing"))
                } else {
                    Ok(tonic::Response::new(message))
                }
            });
            grpc.unary(method, request).await
        }
        "/bouncer.test.Echo/Count" => {
            let method = tower::service_fn(|request: tonic::Request<Bytes>| async move {
                let count: u32 = std::str::from_utf8(request.get_ref())
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .ok_or_else(|| Status::invalid_argument("not a number"))?;
                let stream: MessageStream = Box::pin(futures_util::stream::iter(
                    (0..count).map(|index| Ok(Bytes::from(index.to_string()))),
                ));
                Ok::<_, Status>(tonic::Response::new(stream))
            });
            grpc.server_streaming(method, request).await
        }
        "/bouncer.test.Echo/Sum" => {
            let method =
                tower::service_fn(|request: tonic::Request<Streaming<Bytes>>| async move {
                    let mut messages = request.into_inner();
                    let mut total = 0usize;
                    while let Some(message) = messages.next().await {
                        total += message?.len();
                    }
                    Ok::<_, Status>(tonic::Response::new(Bytes::from(total.to_string())))
                });
            grpc.client_streaming(method, request).await
        }
        "/bouncer.test.Echo/Chat" => {
            let method =
                tower::service_fn(|request: tonic::Request<Streaming<Bytes>>| async move {
                    let replies: MessageStream = Box::pin(request.into_inner().map(|message| {
                        message.map(|message| {
                            let mut reply = b"echo: ".to_vec();
                            reply.extend_from_slice(&message);
                            Bytes::from(reply)
                        })
                    }));
                    Ok::<_, Status>(tonic::Response::new(replies))
                });
            grpc.streaming(method, request).await
        }
        _ => Status::unimplemented("no such method").into_http(),
    };
    Ok(response)
}

/// A gRPC client of the test service over `channel`.
#[derive(Clone)]
pub struct GrpcClient {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
}

impl GrpcClient {
    /// A client that speaks cleartext HTTP/2 (prior knowledge) to `address`.
    pub async fn connect(address: SocketAddr) -> GrpcClient {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .expect("an endpoint")
            .connect()
            .await
            .expect("connect the gRPC client");
        Self::over(channel)
    }

    pub fn over(channel: tonic::transport::Channel) -> GrpcClient {
        GrpcClient {
            grpc: tonic::client::Grpc::new(channel),
        }
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.grpc
            .ready()
            .await
            .map_err(|error| Status::unavailable(error.to_string()))
    }

    pub async fn unary(&mut self, message: &'static [u8]) -> Result<Bytes, Status> {
        self.ready().await?;
        let response = self
            .grpc
            .unary(
                tonic::Request::new(Bytes::from_static(message)),
                PathAndQuery::from_static("/bouncer.test.Echo/Unary"),
                BytesCodec,
            )
            .await?;
        Ok(response.into_inner())
    }

    /// Calls `Count` and collects the stream.
    pub async fn count(&mut self, count: u32) -> Result<Vec<Bytes>, Status> {
        self.ready().await?;
        let response = self
            .grpc
            .server_streaming(
                tonic::Request::new(Bytes::from(count.to_string())),
                PathAndQuery::from_static("/bouncer.test.Echo/Count"),
                BytesCodec,
            )
            .await?;
        let mut stream = response.into_inner();
        let mut messages = Vec::new();
        while let Some(message) = stream.message().await? {
            messages.push(message);
        }
        Ok(messages)
    }

    pub async fn sum(&mut self, messages: Vec<Bytes>) -> Result<Bytes, Status> {
        self.ready().await?;
        let response = self
            .grpc
            .client_streaming(
                tonic::Request::new(futures_util::stream::iter(messages)),
                PathAndQuery::from_static("/bouncer.test.Echo/Sum"),
                BytesCodec,
            )
            .await?;
        Ok(response.into_inner())
    }

    /// Opens `Chat`: messages sent on the returned sender come back on the returned stream.
    pub async fn chat(
        &mut self,
    ) -> Result<(tokio::sync::mpsc::Sender<Bytes>, Streaming<Bytes>), Status> {
        self.ready().await?;
        let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(4);
        let outgoing = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|message| (message, receiver))
        });
        let response = self
            .grpc
            .streaming(
                tonic::Request::new(outgoing),
                PathAndQuery::from_static("/bouncer.test.Echo/Chat"),
                BytesCodec,
            )
            .await?;
        Ok((sender, response.into_inner()))
    }

    /// Calls a method the server does not have.
    pub async fn missing(&mut self) -> Result<Bytes, Status> {
        self.ready().await?;
        let response = self
            .grpc
            .unary(
                tonic::Request::new(Bytes::new()),
                PathAndQuery::from_static("/bouncer.test.Echo/Missing"),
                BytesCodec,
            )
            .await?;
        Ok(response.into_inner())
    }
}
