//! What the tunnel needs to know about an IP packet, and the "too big" answer a router gives.
//!
//! Packets come from the TUN device and from peers; [`inspect`] reads the version and the
//! addresses with `etherparse` and refuses anything that is not a well-formed IPv4 or IPv6
//! header. When a packet does not fit in a datagram, [`too_big`] decides what to do: an IPv4
//! packet with "don't fragment" set and every IPv6 packet get an ICMP "fragmentation needed" /
//! ICMPv6 "packet too big" reply naming the MTU that fits, as a router on the path would send;
//! other IPv4 packets are dropped (the tunnel does not fragment).

use std::net::IpAddr;

use etherparse::{
    Icmpv4Type, Icmpv6Type, Ipv4HeaderSlice, Ipv6HeaderSlice, PacketBuilder,
    icmpv4::DestUnreachableHeader,
};

/// The addressing of one IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// Source address.
    pub source: IpAddr,
    /// Destination address.
    pub destination: IpAddr,
    /// IPv4 "don't fragment" (always true for IPv6, which routers never fragment).
    pub dont_fragment: bool,
}

/// Reads a packet's addresses; `None` for anything that is not an IPv4 or IPv6 packet.
pub fn inspect(packet: &[u8]) -> Option<PacketInfo> {
    match packet.first()? >> 4 {
        4 => {
            let h = Ipv4HeaderSlice::from_slice(packet).ok()?;
            Some(PacketInfo {
                source: h.source_addr().into(),
                destination: h.destination_addr().into(),
                dont_fragment: h.dont_fragment(),
            })
        }
        6 => {
            let h = Ipv6HeaderSlice::from_slice(packet).ok()?;
            Some(PacketInfo {
                source: h.source_addr().into(),
                destination: h.destination_addr().into(),
                dont_fragment: true,
            })
        }
        _ => None,
    }
}

/// What to do with a packet larger than `max` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TooBig {
    /// Send this ICMP packet back to the sender (write it to the TUN device).
    Reply(Vec<u8>),
    /// Drop it silently.
    Drop,
}

/// The answer to `packet`, which exceeds `max` bytes; `from` is this tunnel's own address of the
/// packet's family (the ICMP source), or `None` to answer from the packet's destination.
pub fn too_big(packet: &[u8], max: usize, from: Option<IpAddr>) -> TooBig {
    let Some(info) = inspect(packet) else {
        return TooBig::Drop;
    };
    let mtu = u16::try_from(max).unwrap_or(u16::MAX);
    let mut out = Vec::new();
    let built = match (info.source, from.unwrap_or(info.destination)) {
        (IpAddr::V4(src), IpAddr::V4(us)) => {
            if !info.dont_fragment {
                return TooBig::Drop;
            }
            // RFC 1812: as much of the original as fits in a 576-byte reply.
            let quoted = &packet[..packet.len().min(576 - 20 - 8)];
            PacketBuilder::ipv4(us.octets(), src.octets(), 64)
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
                ))
                .write(&mut out, quoted)
                .is_ok()
        }
        (IpAddr::V6(src), IpAddr::V6(us)) => {
            // RFC 4443: as much as fits without the reply exceeding the minimum MTU, 1280.
            let quoted = &packet[..packet.len().min(1280 - 40 - 8)];
            PacketBuilder::ipv6(us.octets(), src.octets(), 64)
                .icmpv6(Icmpv6Type::PacketTooBig {
                    mtu: u32::from(mtu),
                })
                .write(&mut out, quoted)
                .is_ok()
        }
        _ => false,
    };
    if built {
        TooBig::Reply(out)
    } else {
        TooBig::Drop
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    fn udp4(len: usize, df: bool) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4([10, 0, 0, 2], [10, 9, 0, 1], 64)
            .udp(1000, 2000)
            .write(&mut out, &vec![7u8; len])
            .unwrap();
        if !df {
            // The builder sets DF; the checksum is not checked by `inspect`.
            out[6] &= !0x40;
        }
        out
    }

    fn udp6(len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv6([0xfd; 16], [0xfe; 16], 64)
            .udp(1000, 2000)
            .write(&mut out, &vec![7u8; len])
            .unwrap();
        out
    }

    #[test]
    fn reads_addresses_and_refuses_garbage() {
        let p = udp4(10, true);
        let i = inspect(&p).unwrap();
        assert_eq!(i.destination, "10.9.0.1".parse::<IpAddr>().unwrap());
        assert!(i.dont_fragment);
        assert!(inspect(&udp6(10)).unwrap().source.is_ipv6());
        for junk in [&[][..], &[0x45][..], &[0x60, 0, 0][..], &[0x10; 40][..]] {
            assert_eq!(inspect(junk), None);
            assert_eq!(too_big(junk, 100, None), TooBig::Drop);
        }
    }

    #[test]
    fn ipv4_with_df_gets_fragmentation_needed() {
        let p = udp4(1500, true);
        let TooBig::Reply(r) = too_big(&p, 1400, Some("10.77.0.1".parse().unwrap())) else {
            panic!("no reply")
        };
        let s = SlicedPacket::from_ip(&r).unwrap();
        let Some(NetSlice::Ipv4(ip)) = s.net else {
            panic!()
        };
        assert_eq!(ip.header().destination_addr().octets(), [10, 0, 0, 2]);
        assert_eq!(ip.header().source_addr().octets(), [10, 77, 0, 1]);
        let Some(TransportSlice::Icmpv4(icmp)) = s.transport else {
            panic!()
        };
        assert_eq!(
            icmp.icmp_type(),
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1400
            })
        );
        assert!(r.len() <= 576);
    }

    #[test]
    fn ipv4_without_df_is_dropped() {
        assert_eq!(too_big(&udp4(1500, false), 1400, None), TooBig::Drop);
    }

    #[test]
    fn ipv6_gets_packet_too_big() {
        let TooBig::Reply(r) = too_big(&udp6(1500), 1400, None) else {
            panic!()
        };
        let s = SlicedPacket::from_ip(&r).unwrap();
        let Some(TransportSlice::Icmpv6(icmp)) = s.transport else {
            panic!()
        };
        assert_eq!(icmp.icmp_type(), Icmpv6Type::PacketTooBig { mtu: 1400 });
        assert!(r.len() <= 1280);
    }
}
