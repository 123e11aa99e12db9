//! The board's state that the devices of one exporter share: today its power, as the power
//! device last set it (a `power` device running commands, or `power-sim`). The simulated
//! console goes quiet when it is off and boots again when it comes on; a storage medium shared
//! with the board refuses writes while it is on. Every device of an exporter gets the same
//! [`Board`].

use tokio::sync::watch;

/// The board's power as followers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Power {
    pub on: bool,
    /// How many times it was switched on. A follower compares it with the last it saw, so
    /// that an off and on it did not get to observe separately (a watch keeps only the
    /// latest value; a busy follower can miss a quick cycle) still counts as a boot.
    pub ons: u64,
}

#[derive(Clone, Debug)]
pub struct Board {
    power: watch::Sender<Power>,
}

impl Default for Board {
    fn default() -> Self {
        Self::new()
    }
}

impl Board {
    /// A board whose power is on (a board with no power device is taken as always on).
    pub fn new() -> Self {
        Board {
            power: watch::Sender::new(Power { on: true, ons: 0 }),
        }
    }

    pub fn powered(&self) -> bool {
        self.power.borrow().on
    }

    /// Switches power; subscribers see only real changes.
    pub fn set_power(&self, on: bool) {
        self.power.send_if_modified(|p| {
            if p.on == on {
                return false;
            }
            p.on = on;
            if on {
                p.ons += 1;
            }
            true
        });
    }

    /// Power changes, for a device to follow.
    pub fn subscribe(&self) -> watch::Receiver<Power> {
        self.power.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quick_cycle_a_follower_missed_still_counts_as_a_boot() {
        let b = Board::new();
        let mut rx = b.subscribe();
        let seen = *rx.borrow_and_update();
        b.set_power(false);
        b.set_power(true);
        b.set_power(true);
        let now = *rx.borrow_and_update();
        assert!(now.on && seen.on, "on before and after");
        assert_eq!(now.ons, seen.ons + 1, "one switch-on in between");
    }
}
