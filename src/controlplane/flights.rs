//! Spawns in progress in this process, by sandbox id, so that a retry with
//! the same Idempotency-Key can wait for the first attempt to end instead
//! of polling its record.
//!
//! A flight starts before the spawn's `creating` record is committed and
//! ends (its guard dropped) after the final record is: a retry that found
//! the record `creating` and then finds no flight knows the record has
//! moved on, and reads it once more.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

#[derive(Default)]
pub struct Flights {
    by_id: Mutex<HashMap<String, Arc<Flight>>>,
}

#[derive(Default)]
struct Flight {
    ended: Mutex<bool>,
    changed: Condvar,
}

/// Ends its flight when dropped, on every path out of the spawn.
pub struct FlightGuard<'a> {
    flights: &'a Flights,
    id: String,
    flight: Arc<Flight>,
}

impl Flights {
    pub fn start(&self, id: &str) -> FlightGuard<'_> {
        let flight = Arc::new(Flight::default());
        self.by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned(), flight.clone());
        FlightGuard {
            flights: self,
            id: id.to_owned(),
            flight,
        }
    }

    /// Waits until the flight of `id` ends or `deadline` passes; returns
    /// whether it ended (true at once when there is none).
    pub fn wait(&self, id: &str, deadline: Instant) -> bool {
        let Some(flight) = self
            .by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
        else {
            return true;
        };
        let mut ended = flight.ended.lock().unwrap_or_else(|e| e.into_inner());
        while !*ended {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            ended = flight
                .changed
                .wait_timeout(ended, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        {
            let mut by_id = self.flights.by_id.lock().unwrap_or_else(|e| e.into_inner());
            if by_id
                .get(&self.id)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                by_id.remove(&self.id);
            }
        }
        *self.flight.ended.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.flight.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_waiter_wakes_when_the_flight_ends_and_not_before() {
        let flights = Arc::new(Flights::default());
        let guard = flights.start("sb-1");
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(!flights.wait("sb-1", soon), "a running flight times out");
        let (tx, rx) = crossbeam_channel::bounded(1);
        let waiter = {
            let flights = flights.clone();
            std::thread::spawn(move || {
                let _ = tx.send(());
                flights.wait("sb-1", Instant::now() + Duration::from_secs(30))
            })
        };
        rx.recv().unwrap();
        drop(guard);
        assert!(waiter.join().unwrap(), "the waiter saw the end");
        assert!(
            flights.wait("sb-1", Instant::now()),
            "no flight: nothing to wait for"
        );
        assert!(flights.by_id.lock().unwrap().is_empty());
    }
}
