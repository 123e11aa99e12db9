//! The simulated board that the `*-sim` backends of one exporter share: today its power, so
//! that `power-sim` switching off makes the simulated console go quiet and switching on boots
//! it again. Every sim backend of an exporter gets the same [`SimBoard`].

use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct SimBoard {
    power: watch::Sender<bool>,
}

impl Default for SimBoard {
    fn default() -> Self {
        Self::new()
    }
}

impl SimBoard {
    /// A board whose power is on (a simulated board with no power device is always on).
    pub fn new() -> Self {
        SimBoard {
            power: watch::Sender::new(true),
        }
    }

    pub fn powered(&self) -> bool {
        *self.power.borrow()
    }

    /// Switches power; subscribers see only real changes.
    pub fn set_power(&self, on: bool) {
        self.power
            .send_if_modified(|p| std::mem::replace(p, on) != on);
    }

    /// Power changes, for a sim backend to follow.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.power.subscribe()
    }
}
