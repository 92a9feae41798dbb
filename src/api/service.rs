//! The tonic service: converts wire requests to supervisor calls and results back, with one
//! tracing span per request carrying the container id and the peer (see `api::peer`).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::pacing::{
    MadeAhead, answer_budget, answer_turn, held_answer, socket_has_room, socket_room,
};
use super::peer::{audit, logged, peer};
use super::stream_places::StreamPlaces;
use crate::error::Error;
use crate::events::{Event, EventKind, Lagged};
use crate::model::{AnswerQueue, Checkpoint, ProcessSpec, SocketRoom};
use crate::proto;
use crate::stats::snapshot::{self, Snapshot};
use crate::supervisor::{ContainerInfo, CreateRequest, ExecRequest, StdioPaths, Supervisor, User};

pub struct ApiService {
    supervisor: Arc<Supervisor>,
    /// Turns true when berthd is stopping, which ends the streams that would otherwise never end.
    stopping: tokio::sync::watch::Receiver<bool>,
    limits: Limits,
    stream_places: StreamPlaces,
}

/// The limits requests and responses are held to (their flags' defaults until set).
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// `--max-message-bytes`: no response is built larger (State is refused instead).
    message_bytes: usize,
    /// `--max-process-spec-bytes`: args, env, cwd and additional gids of one process.
    spec_bytes: usize,
    /// `--max-processes-per-container`: added processes running in one container.
    processes: usize,
}

impl ApiService {
    pub fn new(supervisor: Arc<Supervisor>, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        ApiService {
            supervisor,
            stopping,
            limits: Limits {
                message_bytes: 4 * 1024 * 1024,
                spec_bytes: 256 * 1024,
                processes: 1024,
            },
            stream_places: StreamPlaces::new(4096),
        }
    }

    /// Holds each uid other than root's to `most` Events and GetStats streams open at once.
    pub fn limit_streams(mut self, most: usize) -> Self {
        self.stream_places = StreamPlaces::new(most);
        self
    }

    /// Holds responses to `message_bytes`, each process's args, env, cwd and additional gids
    /// to `spec_bytes`, and the processes added to one container to `processes`.
    pub fn limit(mut self, message_bytes: usize, spec_bytes: usize, processes: usize) -> Self {
        self.limits = Limits {
            message_bytes,
            spec_bytes,
            processes,
        };
        self
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send>>;
type StatsStream = Pin<Box<dyn Stream<Item = Result<proto::Stats, Status>> + Send>>;

fn process_to_wire(pid: u32, spec: &ProcessSpec) -> proto::Process {
    proto::Process {
        pid,
        terminal: spec.terminal,
        user: Some(proto::User {
            uid: spec.uid,
            gid: spec.gid,
            additional_gids: spec.additional_gids.clone(),
        }),
        args: spec.args.clone(),
        env: spec.env.clone(),
        cwd: spec.cwd.clone(),
    }
}

fn container_to_wire(info: &ContainerInfo) -> proto::Container {
    proto::Container {
        id: info.id.clone(),
        name: info.id.clone(),
        bundle_path: info.bundle.display().to_string(),
        processes: info
            .processes
            .iter()
            .map(|(pid, spec)| process_to_wire(*pid, spec))
            .collect(),
        status: info.status.as_str().into(),
    }
}

/// Refuses a response that would be larger than `limit` once framed, with `refusal` of its size:
/// berthd never builds a message it cannot send (tonic's own refusal would name a request's
/// limit), and says what to ask for instead.
fn within_message_limit(
    response: &impl prost::Message,
    limit: usize,
    refusal: impl FnOnce(usize) -> String,
) -> Result<(), Error> {
    // The gRPC frame adds a flag byte and a 4-byte length.
    let size = response.encoded_len() + 5;
    if size > limit {
        return Err(Error::ResourceExhausted(refusal(size)));
    }
    Ok(())
}

/// How a stream ends when berthd stops or upgrades: distinct from its natural end, so a client
/// knows to reconnect.
fn going_away() -> Status {
    Status::unavailable(
        "berthd is stopping or upgrading; reconnect to the same socket and subscribe again",
    )
}

/// A stream's `next` item, taken once its connection's socket has room; [`going_away`] if berthd
/// stops or upgrades first; `None` when the stream's source ended. An item already there goes
/// out before the stream ends: berthd collects no exit once it stops, so the last `exit` events
/// published are ones a restart would not report again.
async fn next_unless_stopping<T>(
    room: &mut Option<SocketRoom>,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
    next: impl Future<Output = Option<T>>,
) -> Option<Result<T, Status>> {
    tokio::select! {
        biased;
        next = async {
            socket_has_room(room).await;
            next.await
        } => next.map(Ok),
        _ = stopping.wait_for(|stop| *stop) => Some(Err(going_away())),
    }
}

/// The time the call's `grpc-timeout` gives it, if it has one (a malformed one never gets here:
/// [`super::content_type`] refuses it).
fn call_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?;
    super::content_type::grpc_timeout(value.as_bytes())
}

/// `stream`, ended with DEADLINE_EXCEEDED once `timeout` has passed: tonic holds a call to its
/// `grpc-timeout` only until its answer starts, and an Events or GetStats stream never ends by
/// itself. Without a timeout (or one too far off to count), `stream` as it is.
fn until_deadline<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    timeout: Option<Duration>,
) -> impl Stream<Item = Result<T, Status>> + Send + 'static {
    let Some(deadline) = timeout.and_then(|t| tokio::time::Instant::now().checked_add(t)) else {
        return Either::Left(stream);
    };
    let stream = Box::pin(stream);
    Either::Right(futures_util::stream::unfold(
        Some(stream),
        move |stream| async move {
            let mut stream = stream?;
            tokio::select! {
                item = stream.next() => Some((item?, Some(stream))),
                () = tokio::time::sleep_until(deadline) => Some((
                    Err(Status::deadline_exceeded(
                        "the call's deadline (its grpc-timeout) has passed: the stream ends here",
                    )),
                    None,
                )),
            }
        },
    ))
}

fn checkpoint_to_wire(checkpoint: &Checkpoint) -> proto::Checkpoint {
    proto::Checkpoint {
        name: checkpoint.name.clone(),
        exit: checkpoint.exit,
        tcp: checkpoint.tcp,
        unix_sockets: checkpoint.unix_sockets,
        shell: checkpoint.shell,
    }
}

fn event_to_wire(event: &Event) -> proto::Event {
    let mut wire = proto::Event {
        r#type: event.kind.name().into(),
        id: event.id.clone(),
        pid: event.pid,
        ..Default::default()
    };
    match &event.kind {
        EventKind::StartContainer { bundle } | EventKind::Live { bundle } => {
            wire.bundle_path = bundle.clone()
        }
        EventKind::StartProcess { process } => {
            wire.process = Some(process_to_wire(event.pid, process))
        }
        EventKind::Exit { status } => wire.status = *status,
        EventKind::Checkpoint { checkpoint } => {
            wire.checkpoint = Some(checkpoint_to_wire(checkpoint))
        }
        EventKind::Pause | EventKind::Resume | EventKind::Oom => {}
    }
    wire
}

fn memory_to_wire(data: &snapshot::MemoryData) -> proto::MemoryData {
    proto::MemoryData {
        usage: data.usage,
        max_usage: data.max_usage,
        failcnt: data.failcnt,
    }
}

fn blkio_to_wire(entries: &[snapshot::BlkioEntry]) -> Vec<proto::BlkioStatsEntry> {
    entries
        .iter()
        .map(|e| proto::BlkioStatsEntry {
            major: e.major,
            minor: e.minor,
            op: e.op.to_string(),
            value: e.value,
        })
        .collect()
}

fn stats_to_wire(s: &Snapshot) -> proto::Stats {
    let [
        service_bytes,
        serviced,
        queued,
        service_time,
        wait_time,
        merged,
        time,
        sectors,
    ] = &s.blkio.lists;
    proto::Stats {
        network_stats: s
            .network
            .iter()
            .map(|i| proto::NetworkStats {
                name: i.name.to_string(),
                rx_bytes: i.rx_bytes,
                rx_packets: i.rx_packets,
                rx_errors: i.rx_errors,
                rx_dropped: i.rx_dropped,
                tx_bytes: i.tx_bytes,
                tx_packets: i.tx_packets,
                tx_errors: i.tx_errors,
                tx_dropped: i.tx_dropped,
            })
            .collect(),
        cgroup_stats: Some(proto::CgroupStats {
            cpu_stats: Some(proto::CpuStats {
                cpu_usage: Some(proto::CpuUsage {
                    total_usage: s.cpu.total,
                    percpu_usage: s.cpu.percpu.clone(),
                    usage_in_kernelmode: s.cpu.kernel,
                    usage_in_usermode: s.cpu.user,
                }),
                throttling_data: Some(proto::ThrottlingData {
                    periods: s.cpu.periods,
                    throttled_periods: s.cpu.throttled_periods,
                    throttled_time: s.cpu.throttled_time,
                }),
            }),
            memory_stats: Some(proto::MemoryStats {
                cache: s.memory.cache,
                usage: Some(memory_to_wire(&s.memory.usage)),
                swap_usage: Some(memory_to_wire(&s.memory.swap)),
                kernel_usage: Some(memory_to_wire(&s.memory.kernel)),
                stats: s
                    .memory
                    .stats
                    .iter()
                    .map(|(key, value)| (key.to_string(), *value))
                    .collect(),
            }),
            blkio_stats: Some(proto::BlkioStats {
                io_service_bytes_recursive: blkio_to_wire(service_bytes),
                io_serviced_recursive: blkio_to_wire(serviced),
                io_queued_recursive: blkio_to_wire(queued),
                io_service_time_recursive: blkio_to_wire(service_time),
                io_wait_time_recursive: blkio_to_wire(wait_time),
                io_merged_recursive: blkio_to_wire(merged),
                io_time_recursive: blkio_to_wire(time),
                sectors_recursive: blkio_to_wire(sectors),
            }),
            hugetlb_stats: s
                .hugetlb
                .iter()
                .map(|(size, data)| {
                    let data = proto::HugetlbStats {
                        usage: data.usage,
                        max_usage: data.max_usage,
                        failcnt: data.failcnt,
                    };
                    (size.to_string(), data)
                })
                .collect(),
        }),
        timestamp: s.timestamp,
    }
}

#[tonic::async_trait]
impl proto::api_server::Api for ApiService {
    async fn create_container(
        &self,
        request: Request<proto::CreateContainerRequest>,
    ) -> Result<Response<proto::CreateContainerResponse>, Status> {
        let peer = peer(&request)?;
        let r = request.into_inner();
        let span = tracing::info_span!("create_container", id = %logged(&r.id), peer_uid = peer.uid, peer_pid = peer.pid);
        span.in_scope(|| audit(&peer, "CreateContainer", &r.id));
        let caller = self.supervisor.caller(peer);
        let request = CreateRequest {
            id: r.id,
            bundle: r.bundle_path,
            stdio: StdioPaths {
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
                console: r.console,
                caller: Some(std::sync::Arc::clone(&caller)),
            },
            checkpoint: r.checkpoint,
            max_spec_bytes: self.limits.spec_bytes,
            caller,
        };
        let pid = self.supervisor.create(request).instrument(span).await?;
        Ok(Response::new(proto::CreateContainerResponse { pid }))
    }

    async fn update_container(
        &self,
        request: Request<proto::UpdateContainerRequest>,
    ) -> Result<Response<proto::UpdateContainerResponse>, Status> {
        let peer = peer(&request)?;
        let r = request.into_inner();
        let span = tracing::info_span!("update_container", id = %logged(&r.id), peer_uid = peer.uid, peer_pid = peer.pid);
        span.in_scope(|| audit(&peer, "UpdateContainer", &r.id));
        self.supervisor
            .update(peer.uid, &r.id, &r.status, r.signal)
            .instrument(span)
            .await?;
        Ok(Response::new(proto::UpdateContainerResponse {}))
    }

    async fn signal(
        &self,
        request: Request<proto::SignalRequest>,
    ) -> Result<Response<proto::SignalResponse>, Status> {
        let peer = peer(&request)?;
        let r = request.into_inner();
        let _span =
            tracing::info_span!("signal", id = %logged(&r.id), peer_uid = peer.uid, peer_pid = peer.pid)
                .entered();
        audit(&peer, "Signal", &r.id);
        self.supervisor.signal(&r.id, r.pid, r.signal)?;
        Ok(Response::new(proto::SignalResponse {}))
    }

    async fn add_process(
        &self,
        request: Request<proto::AddProcessRequest>,
    ) -> Result<Response<proto::AddProcessResponse>, Status> {
        let peer = peer(&request)?;
        let r = request.into_inner();
        let span = tracing::info_span!("add_process", id = %logged(&r.id), peer_uid = peer.uid, peer_pid = peer.pid);
        span.in_scope(|| audit(&peer, "AddProcess", &r.id));
        let caller = self.supervisor.caller(peer);
        let request = ExecRequest {
            id: r.id,
            args: r.args,
            env: r.env,
            cwd: r.cwd,
            user: r.user.map(|u| User {
                uid: u.uid,
                gid: u.gid,
                additional_gids: u.additional_gids,
            }),
            terminal: r.terminal,
            stdio: StdioPaths {
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
                console: r.console,
                caller: Some(caller),
            },
            max_spec_bytes: self.limits.spec_bytes,
            max_processes: self.limits.processes,
            // Encoded, a process takes at most about half again its spec's bytes (a tag and a
            // length per string): two thirds of a message leave State room for the rest.
            max_container_spec_bytes: self.limits.message_bytes / 3 * 2,
        };
        let pid = self.supervisor.exec(request).instrument(span).await?;
        Ok(Response::new(proto::AddProcessResponse { pid }))
    }

    async fn create_checkpoint(
        &self,
        request: Request<proto::CreateCheckpointRequest>,
    ) -> Result<Response<proto::CreateCheckpointResponse>, Status> {
        let peer = peer(&request)?;
        let r = request.into_inner();
        let span = tracing::info_span!("create_checkpoint", id = %logged(&r.id), peer_uid = peer.uid, peer_pid = peer.pid);
        span.in_scope(|| audit(&peer, "CreateCheckpoint", &r.id));
        let caller = self.supervisor.caller(peer);
        let wire = r.checkpoint.ok_or_else(|| {
            Status::from(Error::InvalidArgument(
                "checkpoint is missing: give at least its name".into(),
            ))
        })?;
        let checkpoint = Checkpoint {
            name: wire.name,
            exit: wire.exit,
            tcp: wire.tcp,
            unix_sockets: wire.unix_sockets,
            shell: wire.shell,
        };
        self.supervisor
            .checkpoint(&r.id, checkpoint, &caller)
            .instrument(span)
            .await?;
        Ok(Response::new(proto::CreateCheckpointResponse {}))
    }

    async fn delete_checkpoint(
        &self,
        request: Request<proto::DeleteCheckpointRequest>,
    ) -> Result<Response<proto::DeleteCheckpointResponse>, Status> {
        let peer = peer(&request)?;
        let r = request.into_inner();
        let span = tracing::info_span!("delete_checkpoint", id = %logged(&r.id), peer_uid = peer.uid, peer_pid = peer.pid);
        span.in_scope(|| audit(&peer, "DeleteCheckpoint", &r.id));
        let caller = self.supervisor.caller(peer);
        self.supervisor
            .delete_checkpoint(&r.id, &r.name, &caller)
            .instrument(span)
            .await?;
        Ok(Response::new(proto::DeleteCheckpointResponse {}))
    }

    async fn list_checkpoint(
        &self,
        request: Request<proto::ListCheckpointRequest>,
    ) -> Result<Response<proto::ListCheckpointResponse>, Status> {
        let peer = peer(&request)?;
        let budget = answer_budget(&request);
        let r = request.into_inner();
        let span = tracing::info_span!("list_checkpoint", id = %logged(&r.id), peer_uid = peer.uid, peer_pid = peer.pid);
        let caller = self.supervisor.caller(peer);
        // Before the listing, so that listings waiting for their bytes are never more than one:
        // a listing that waits for a dump into its bundle holds up the uid's other listings only.
        let turn = answer_turn(&budget, AnswerQueue::ListCheckpoint).await;
        let checkpoints = self
            .supervisor
            .list_checkpoints(&r.id, &caller)
            .instrument(span)
            .await?;
        let response = proto::ListCheckpointResponse {
            checkpoints: checkpoints.iter().map(checkpoint_to_wire).collect(),
        };
        let limit = self.limits.message_bytes;
        within_message_limit(&response, limit, |size| {
            format!(
                "the {} checkpoints of {} would be {size} bytes listed, more than --max-message-bytes ({limit}); delete those no longer needed, or raise the limit",
                response.checkpoints.len(),
                logged(&r.id)
            )
        })?;
        Ok(held_answer(response, &budget, turn).await)
    }

    async fn state(
        &self,
        request: Request<proto::StateRequest>,
    ) -> Result<Response<proto::StateResponse>, Status> {
        let peer = peer(&request)?;
        let budget = answer_budget(&request);
        let id = request.into_inner().id;
        let span = tracing::info_span!("state", id = %logged(&id), peer_uid = peer.uid, peer_pid = peer.pid);
        let turn = answer_turn(&budget, AnswerQueue::State).await;
        let response = span.in_scope(|| -> Result<proto::StateResponse, Status> {
            let machine = self.supervisor.machine();
            let containers = if id.is_empty() {
                self.supervisor
                    .containers_within(self.limits.message_bytes)?
            } else {
                vec![self.supervisor.container_info(&id)?]
            };
            Ok(proto::StateResponse {
                containers: containers.iter().map(container_to_wire).collect(),
                machine: Some(proto::Machine {
                    id: machine.id.clone(),
                    cpus: machine.cpus,
                    memory: machine.memory,
                }),
            })
        })?;
        let limit = self.limits.message_bytes;
        within_message_limit(&response, limit, |size| {
            format!(
                "State of {} containers would be {size} bytes, more than --max-message-bytes ({limit}); ask for one container with StateRequest.id",
                response.containers.len()
            )
        })?;
        Ok(held_answer(response, &budget, turn).await)
    }

    type EventsStream = EventStream;

    async fn events(
        &self,
        request: Request<proto::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let peer = peer(&request)?;
        tracing::info_span!("events", peer_uid = peer.uid, peer_pid = peer.pid)
            .in_scope(|| tracing::debug!("subscribed"));
        let place = self.stream_places.take(peer.uid)?;
        let timeout = call_timeout(&request);
        let subscription = self.supervisor.events().subscribe();
        // Taken only while the connection's socket has room, and each made only once it holds
        // its bytes of the uid's budget for messages not yet read, so a client that stops
        // reading, or gives its streams no window, falls behind on the event ring instead of
        // growing buffers in h2, and is told how much it missed.
        let room = socket_room(&request);
        let budget = answer_budget(&request);
        let made = MadeAhead::default();
        let stopping = self.stopping.clone();
        let stream = futures_util::stream::unfold(
            Some((subscription, room, budget, made.clone(), stopping, place)),
            |state| async move {
                let (mut subscription, mut room, budget, made, mut stopping, place) = state?;
                let next = loop {
                    let next = next_unless_stopping(&mut room, &mut stopping, subscription.next());
                    let event = match next.await? {
                        Ok(Ok(event)) => event,
                        Ok(Err(lagged)) => break Err(lagged),
                        Err(going_away) => return Some((Err(going_away), None)),
                    };
                    let bytes = usize::try_from(event.bytes()).unwrap_or(usize::MAX);
                    let held = tokio::select! {
                        biased;
                        () = made.hold(&budget, bytes) => true,
                        _ = stopping.wait_for(|stop| *stop) => false,
                    };
                    // At a stop, only an exit goes out past the budget: berthd collects none
                    // after it, so a restart would not report it again. The rest the client
                    // reads again in State once it has subscribed again.
                    if held || matches!(event.kind, EventKind::Exit { .. }) {
                        break Ok(event);
                    }
                };
                match next {
                    Ok(event) => {
                        let state = (subscription, room, budget, made, stopping, place);
                        Some((Ok(event_to_wire(&event)), Some(state)))
                    }
                    Err(Lagged::Missed(missed)) => Some((
                        Err(Status::resource_exhausted(format!(
                            "events subscriber fell behind: {missed} events were dropped before it read them, and the stream ends here, so none after them is sent either; subscribe again and re-read State"
                        ))),
                        None,
                    )),
                    Err(Lagged::Bytes(bytes)) => Some((
                        Err(Status::resource_exhausted(format!(
                            "events subscriber left {} MiB of events untaken, more than berthd keeps for one; subscribe again and re-read State",
                            bytes >> 20
                        ))),
                        None,
                    )),
                }
            },
        );
        let stream = until_deadline(stream, timeout);
        let mut response = Response::new(
            Box::pin(crate::heap::release_when_dropped(stream)) as Self::EventsStream
        );
        response.extensions_mut().insert(made);
        Ok(response)
    }

    type GetStatsStream = StatsStream;

    async fn get_stats(
        &self,
        request: Request<proto::StatsRequest>,
    ) -> Result<Response<Self::GetStatsStream>, Status> {
        let peer = peer(&request)?;
        let room = socket_room(&request);
        let timeout = call_timeout(&request);
        let id = request.into_inner().id;
        let span = tracing::info_span!("get_stats", id = %logged(&id), peer_uid = peer.uid, peer_pid = peer.pid);
        crate::supervisor::validate::container_id(&id)?;
        let place = self.stream_places.take(peer.uid)?;
        // Opening a container's stats files is file system work: off the reactor.
        let supervisor = Arc::clone(&self.supervisor);
        let subscription = tokio::task::spawn_blocking(move || {
            let _span = span.entered();
            supervisor.subscribe_stats(&id)
        })
        .await
        .map_err(|e| Error::Internal(format!("subscribing to stats ended abnormally: {e}")))??;
        // Each subscriber waits for the shared snapshot, while its connection's socket has room
        // (a client that stops reading skips snapshots); the stream ends with OK when the
        // container is unregistered (its init exited), with UNAVAILABLE when berthd stops or
        // upgrades.
        let stopping = self.stopping.clone();
        let stream = futures_util::stream::unfold(
            Some((subscription, room, stopping, place)),
            |state| async move {
                let (mut subscription, mut room, mut stopping, place) = state?;
                let snapshot =
                    match next_unless_stopping(&mut room, &mut stopping, subscription.next())
                        .await?
                    {
                        Ok(snapshot) => snapshot,
                        Err(going_away) => return Some((Err(going_away), None)),
                    };
                Some((
                    Ok(stats_to_wire(&snapshot)),
                    Some((subscription, room, stopping, place)),
                ))
            },
        );
        let stream = until_deadline(stream, timeout);
        Ok(Response::new(Box::pin(crate::heap::release_when_dropped(
            stream,
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_over_the_message_limit_is_refused_with_what_to_do() {
        let listing = proto::ListCheckpointResponse {
            checkpoints: (0..100)
                .map(|n| proto::Checkpoint {
                    name: format!("checkpoint-{n:04}"),
                    ..Default::default()
                })
                .collect(),
        };
        let size = prost::Message::encoded_len(&listing) + 5;
        assert!(within_message_limit(&listing, size, |_| unreachable!()).is_ok());
        let refused = within_message_limit(&listing, size - 1, |size| format!("{size} bytes"));
        match refused {
            Err(Error::ResourceExhausted(message)) => assert_eq!(message, format!("{size} bytes")),
            other => panic!("{other:?}"),
        }
    }
}
