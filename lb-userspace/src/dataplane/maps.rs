//! Typed reads and writes of the service, backend, Maglev and port maps, and the counters.
//! Writers are `pub(crate)` where nothing outside needs them: the reconciler is their one caller.

use super::*;

/// The pause between the epoch's odd write and the first table write of a change, and between
/// the last table write and the even write (lb-common's `epoch`). A program's pick reads the
/// epoch, the tables, the epoch again within microseconds; on x86 that order alone makes a pick
/// that saw any write of a change see the epoch move. Where loads may be reordered (arm64), this
/// gap does: a pick whose reads straddle a change's first or last table write would have to
/// take longer than the gap.
const EPOCH_GAP: std::time::Duration = std::time::Duration::from_millis(1);

impl Dataplane {
    // ---- services and backends ----

    pub(crate) fn set_service(&mut self, key: ServiceKey, value: ServiceValue) -> Result<()> {
        self.changing()?;
        self.services
            .insert(&key, &value, 0)
            .map_err(map_err(MAP_SERVICES))
    }

    pub(crate) fn remove_service(&mut self, key: &ServiceKey) -> Result<()> {
        self.changing()?;
        absent_is_fine(self.services.remove(key), MAP_SERVICES)
    }

    pub fn services(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.services.iter().filter_map(|r| r.ok()).collect()
    }

    /// Writes a backend slot, dropping any route cached for the slot's previous occupant.
    ///
    /// Public only for the fixture that proves the cached route is dropped; the reconciler is
    /// the one writer of the maps (the other writers are `pub(crate)`).
    pub fn set_backend(&mut self, id: u32, backend: Backend) -> Result<()> {
        self.changing()?;
        self.backend_routes
            .set(id, &lb_common::BackendRoute::default(), 0)
            .map_err(map_err(lb_common::MAP_BACKEND_ROUTES))?;
        self.backends
            .set(id, &backend, 0)
            .map_err(map_err(MAP_BACKENDS))
    }

    // ---- the table epoch (lb-common's `epoch`) ----

    /// Marks the tables a pick reads (services, backends, Maglev rows, this host's addresses)
    /// as changing before their first write: the epoch goes odd and new, so no flow picked from
    /// now until [`Dataplane::settle`] is stamped (its replies keep the forward lookup). Every
    /// writer of those tables calls it first.
    pub(super) fn changing(&mut self) -> Result<()> {
        if self.changing {
            return Ok(());
        }
        let current = self.epoch_word()?.epoch;
        self.write_epoch(lb_common::epoch::begin(current))?;
        self.changing = true;
        // A pick that read the epoch before this write has ended long before the first table
        // write (see `EPOCH_GAP`).
        std::thread::sleep(EPOCH_GAP);
        Ok(())
    }

    /// Ends a change of those tables (nothing if none is under way): the epoch becomes even and
    /// new, written for this load's program, whose new flows are stamped with it from now on.
    /// The reconciler calls it after each apply, whether or not every write succeeded: what
    /// counts is that the tables stand still until the next change.
    pub fn settle(&mut self) -> Result<()> {
        if !self.changing {
            return Ok(());
        }
        let current = self.epoch_word()?.epoch;
        // A pick that reads the new epoch reads the tables long after their last write.
        std::thread::sleep(EPOCH_GAP);
        self.write_epoch(lb_common::epoch::settle(current))?;
        self.changing = false;
        Ok(())
    }

    /// The epoch this load's program stamps new flows with now (0: none, a change is under
    /// way).
    pub fn epoch(&self) -> Result<u64> {
        Ok(lb_common::epoch::stable(&self.epoch_word()?, self.instance))
    }

    /// This load's instance token (`DpConfig::instance`), written beside the epoch.
    pub fn instance(&self) -> u32 {
        self.instance
    }

    /// Writes the current epoch value for the program of load `instance`, as the daemon of
    /// another load writes it (the berth replacing this one, with its own program's token):
    /// for tests that this load's program then neither stamps with it nor trusts its stamps.
    pub fn write_epoch_as(&mut self, instance: u32) -> Result<()> {
        let word = lb_common::epoch::Epoch {
            instance,
            ..self.epoch_word()?
        };
        self.set_epoch_word(word)
    }

    fn epoch_word(&self) -> Result<lb_common::epoch::Epoch> {
        self.epoch
            .get(&0, 0)
            .map_err(map_err(lb_common::epoch::MAP_EPOCH))
    }

    fn write_epoch(&mut self, epoch: u64) -> Result<()> {
        self.set_epoch_word(lb_common::epoch::Epoch {
            epoch,
            instance: self.instance,
            _pad: 0,
        })
    }

    fn set_epoch_word(&mut self, word: lb_common::epoch::Epoch) -> Result<()> {
        self.epoch
            .set(0, &word, 0)
            .map_err(map_err(lb_common::epoch::MAP_EPOCH))
    }

    /// A backend slot as the kernel holds it.
    pub fn backend(&self, id: u32) -> Result<Backend> {
        self.backends.get(&id, 0).map_err(map_err(MAP_BACKENDS))
    }

    /// The route cached for a backend id.
    pub fn backend_route(&self, id: u32) -> Result<lb_common::BackendRoute> {
        self.backend_routes
            .get(&id, 0)
            .map_err(map_err(lb_common::MAP_BACKEND_ROUTES))
    }

    /// Writes one slot of a service's Maglev row.
    pub(crate) fn set_maglev_slot(
        &mut self,
        service_id: u32,
        slot: u32,
        backend_id: u32,
    ) -> Result<()> {
        let index = service_id * self.options.maglev_size + slot;
        self.changing()?;
        self.maglev
            .set(index, &backend_id, 0)
            .map_err(map_err(MAP_MAGLEV))
    }

    pub fn maglev_slot(&self, service_id: u32, slot: u32) -> Result<u32> {
        let index = service_id * self.options.maglev_size + slot;
        self.maglev.get(&index, 0).map_err(map_err(MAP_MAGLEV))
    }

    /// Adds `PORT_F_*` bits to a (host-order) port's filter entry.
    pub(crate) fn add_port_flags(&mut self, port: u16, flags: u8) -> Result<()> {
        let name = lb_common::MAP_PORTS;
        let cur = self.ports.get(&u32::from(port), 0).map_err(map_err(name))?;
        if cur & flags != flags {
            self.ports
                .set(u32::from(port), &(cur | flags), 0)
                .map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Adds to its port's filter entry the bits of a service of `proto` listening at `listen`
    /// (lb-common's `service_port_flags`: the service bit and which lookup finds it).
    pub(crate) fn add_service_port(
        &mut self,
        listen: std::net::SocketAddr,
        proto: u8,
    ) -> Result<()> {
        let any = listen.ip().is_unspecified();
        self.add_port_flags(listen.port(), lb_common::service_port_flags(proto, any))
    }

    /// A (host-order) port's filter entry: its `PORT_F_*` bits.
    pub fn port_flags(&self, port: u16) -> Result<u8> {
        let name = lb_common::MAP_PORTS;
        self.ports.get(&u32::from(port), 0).map_err(map_err(name))
    }

    /// Overwrites a (host-order) port's filter entry. Public only for the fixture that writes
    /// an entry as a berth before the address bits did (`lb_common::service_lookups`); the
    /// reconciler only adds bits ([`Self::add_port_flags`]).
    pub fn set_port_flags(&mut self, port: u16, flags: u8) -> Result<()> {
        let name = lb_common::MAP_PORTS;
        self.ports
            .set(u32::from(port), &flags, 0)
            .map_err(map_err(name))
    }

    // ---- counters ----

    fn sum<T: Copy + Default + aya::Pod>(
        map: &PerCpuArray<MapData, T>,
        index: u32,
        name: &'static str,
        add: impl Fn(T, T) -> T,
    ) -> Result<T> {
        let values = map.get(&index, 0).map_err(map_err(name))?;
        Ok(values.iter().fold(T::default(), |acc, v| add(acc, *v)))
    }

    pub fn service_counters(&self, id: u32) -> Result<Counters> {
        Self::sum(&self.service_stats, id, MAP_SERVICE_STATS, add_counters)
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters> {
        Self::sum(&self.backend_stats, id, MAP_BACKEND_STATS, add_counters)
    }

    /// All reason counters, summed over CPUs, in `Reason::ALL` order.
    pub fn reason_counters(&self) -> Result<Vec<(Reason, u64)>> {
        Reason::ALL
            .iter()
            .map(|&r| {
                Ok((
                    r,
                    Self::sum(&self.reason_stats, r as u32, MAP_REASON_STATS, |a, b| a + b)?,
                ))
            })
            .collect()
    }

    /// Zeroed counters for every CPU, for a write to the per-CPU map `name` (named in errors).
    fn zeroed_per_cpu(name: &'static str) -> Result<PerCpuValues<Counters>> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
            name,
            source: MapError::IoError(e),
        })?;
        PerCpuValues::try_from(vec![Counters::default(); cpus.get() as usize]).map_err(|e| {
            DataplaneError::Map {
                name,
                source: MapError::IoError(e),
            }
        })
    }

    /// Zeroes a service id's counters (before the id is given to a new service).
    pub(crate) fn reset_service_counters(&mut self, id: u32) -> Result<()> {
        let zero = Self::zeroed_per_cpu(MAP_SERVICE_STATS)?;
        self.service_stats
            .set(id, zero, 0)
            .map_err(map_err(MAP_SERVICE_STATS))
    }

    /// Zeroes a backend id's counters (before the id is given to a new backend).
    pub(crate) fn reset_backend_counters(&mut self, id: u32) -> Result<()> {
        let zero = Self::zeroed_per_cpu(MAP_BACKEND_STATS)?;
        self.backend_stats
            .set(id, zero, 0)
            .map_err(map_err(MAP_BACKEND_STATS))
    }
}

pub(super) fn add_counters(a: Counters, b: Counters) -> Counters {
    Counters {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
        new_flows: a.new_flows + b.new_flows,
    }
}
