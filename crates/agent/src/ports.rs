//! Host ports: allocated by the agent, checked by binding, recorded with the task so two tasks
//! never share one, including across agent restarts (the agent rebuilds the set from task dirs).

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::sync::Mutex;

pub struct PortAllocator {
    range: RangeInclusive<u16>,
    state: Mutex<(BTreeSet<u16>, u16)>,
}

impl PortAllocator {
    pub fn new(range: RangeInclusive<u16>) -> Self {
        let start = *range.start();
        PortAllocator {
            range,
            state: Mutex::new((BTreeSet::new(), start)),
        }
    }

    /// Marks a port as taken by a task found on disk.
    pub fn reserve(&self, port: u16) {
        if let Ok(mut s) = self.state.lock() {
            s.0.insert(port);
        }
    }

    pub fn release(&self, port: u16) {
        if let Ok(mut s) = self.state.lock() {
            s.0.remove(&port);
        }
    }

    /// A free port: not reserved by a task, and bindable right now. Rotates through the range
    /// so a port just released is not handed out again at once.
    pub fn allocate(&self) -> Option<u16> {
        let mut guard = self.state.lock().ok()?;
        let (reserved, cursor) = &mut *guard;
        let (lo, hi) = (*self.range.start(), *self.range.end());
        let size = u32::from(hi - lo) + 1;
        for i in 0..size {
            let port = lo + ((u32::from(*cursor - lo) + i) % size) as u16;
            if reserved.contains(&port) {
                continue;
            }
            if TcpListener::bind(("0.0.0.0", port)).is_ok() {
                reserved.insert(port);
                *cursor = if port == hi { lo } else { port + 1 };
                return Some(port);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_hands_out_a_reserved_or_bound_port() {
        let busy = TcpListener::bind("0.0.0.0:0").unwrap();
        let busy_port = busy.local_addr().unwrap().port();
        let alloc = PortAllocator::new(busy_port..=busy_port.saturating_add(2));
        alloc.reserve(busy_port.saturating_add(1));
        let got = alloc.allocate();
        assert_eq!(got, Some(busy_port + 2));
        assert_eq!(alloc.allocate(), None, "everything is taken");
        alloc.release(busy_port + 2);
        assert_eq!(alloc.allocate(), Some(busy_port + 2));
    }
}
