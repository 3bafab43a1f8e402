//! The worker's executor: the `worker-N` threads that call providers.
//!
//! Provider calls may be slow or hang, so they never run on an HTTP or store
//! thread: the executor threads take jobs from a bounded queue and the
//! caller waits with a deadline. A spawn whose caller gave up is undone by
//! the executor when the provider finally returns, so a late runtime is
//! never left behind; a destroy that answers late runs the caller's `Late`
//! continuation.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use crate::providers::{Provider, ProviderError, RuntimeSpec};
use crate::supervise::ExitNotifier;

/// Why a provider call through the executor did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    #[error("provider failed: {0}")]
    Provider(#[source] ProviderError),
    /// The provider did not answer within the deadline.
    #[error("provider did not answer in time")]
    Timeout,
    /// The executor queue is full or its threads are gone.
    #[error("executor unavailable: {0}")]
    Unavailable(String),
}

enum JobKind {
    Spawn(RuntimeSpec),
    Destroy(String),
}

/// What a late provider result should do once its caller gave up.
pub type Late = Box<dyn FnOnce(Result<(), ProviderError>) + Send>;

/// The hand-off between a caller waiting with a deadline and the executor:
/// whichever comes second decides who handles the result, under one lock,
/// so a result is never lost between "timed out" and "finished".
#[derive(Default)]
struct Handoff {
    state: Mutex<HandoffState>,
}

#[derive(Default, PartialEq, Eq)]
enum HandoffState {
    #[default]
    Waiting,
    /// The caller stopped waiting: the executor handles the result.
    Abandoned,
    /// The result was sent to the caller.
    Answered,
}

struct Job {
    provider: Arc<dyn Provider>,
    kind: JobKind,
    reply: Sender<Result<(), ProviderError>>,
    handoff: Arc<Handoff>,
    late: Option<Late>,
}

#[derive(Clone)]
pub struct ExecutorHandle {
    jobs: Sender<Job>,
}

impl ExecutorHandle {
    fn run(
        &self,
        provider: &Arc<dyn Provider>,
        kind: JobKind,
        deadline: Duration,
        late: Option<Late>,
    ) -> Result<(), ExecError> {
        let (reply, answer) = bounded(1);
        let handoff = Arc::new(Handoff::default());
        let job = Job {
            provider: provider.clone(),
            kind,
            reply,
            handoff: handoff.clone(),
            late,
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(ExecError::Unavailable("job queue is full".into()));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(ExecError::Unavailable("executor stopped".into()));
            }
        }
        if let Ok(result) = answer.recv_timeout(deadline) {
            return result.map_err(ExecError::Provider);
        }
        let mut state = handoff.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state == HandoffState::Answered {
            // Finished just as the deadline passed: the answer is there.
            return answer
                .recv()
                .map_err(|_| ExecError::Timeout)?
                .map_err(ExecError::Provider);
        }
        *state = HandoffState::Abandoned;
        Err(ExecError::Timeout)
    }

    /// Starts a runtime. A spawn that finishes after its caller gave up is
    /// destroyed, so a late runtime is never left behind.
    pub fn spawn(
        &self,
        provider: &Arc<dyn Provider>,
        spec: RuntimeSpec,
        deadline: Duration,
    ) -> Result<(), ExecError> {
        self.run(provider, JobKind::Spawn(spec), deadline, None)
    }

    /// Destroys a runtime; `late` runs with the result if it arrives after
    /// the deadline (the caller has answered "timeout" by then).
    pub fn destroy(
        &self,
        provider: &Arc<dyn Provider>,
        sandbox_id: &str,
        deadline: Duration,
        late: Option<Late>,
    ) -> Result<(), ExecError> {
        self.run(
            provider,
            JobKind::Destroy(sandbox_id.to_owned()),
            deadline,
            late,
        )
    }
}

pub struct Executor {
    pub handle: ExecutorHandle,
    threads: Vec<JoinHandle<()>>,
}

impl Executor {
    pub fn start(threads: usize, on_exit: &ExitNotifier) -> std::io::Result<Executor> {
        let (jobs, queue) = bounded::<Job>(1024);
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let queue = queue.clone();
            let on_exit = on_exit.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || {
                        let _exit = on_exit.guard("worker");
                        run_jobs(&queue);
                    })?,
            );
        }
        Ok(Executor {
            handle: ExecutorHandle { jobs },
            threads: handles,
        })
    }

    /// Waits for the jobs in hand; the queue closes when every handle is gone.
    pub fn join(self) {
        drop(self.handle);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn run_jobs(queue: &Receiver<Job>) {
    while let Ok(job) = queue.recv() {
        let result = match &job.kind {
            JobKind::Spawn(spec) => job.provider.spawn(spec),
            JobKind::Destroy(id) => job.provider.destroy(id),
        };
        let mut state = job.handoff.state.lock().unwrap_or_else(|e| e.into_inner());
        if *state == HandoffState::Abandoned {
            drop(state);
            match (&job.kind, job.late) {
                (JobKind::Spawn(spec), _) => {
                    if result.is_ok() {
                        log::warn!(
                            "spawn of {} finished after its caller gave up; destroying the runtime",
                            spec.sandbox_id
                        );
                        if let Err(e) = job.provider.destroy(&spec.sandbox_id) {
                            log::error!("could not destroy late runtime {}: {e}", spec.sandbox_id);
                        }
                    }
                }
                (JobKind::Destroy(_), Some(late)) => late(result),
                (JobKind::Destroy(id), None) => {
                    log::warn!("destroy of {id} finished after its caller gave up: {result:?}")
                }
            }
        } else {
            *state = HandoffState::Answered;
            let _ = job.reply.send(result);
        }
    }
}
