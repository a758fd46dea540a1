//! Geo-routing: a client's location from a MaxMind DB (City or Country layouts: GeoIP2,
//! GeoLite2, DB-IP), the distance to each data center, and the order in which a route's pools
//! should serve it: a pinned region first, then nearest first.
//!
//! The database is read into memory when the config loads (it is one of the config's watched
//! files), so a replaced file goes through the ordinary reload: a corrupt one is refused and the
//! reader in the serving snapshot stays. Lookups need no cache: one takes a few hundred
//! nanoseconds (see `benches/geo.rs`).

use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

/// Where the database places a client.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Place {
    /// ISO 3166 alpha-2, upper case.
    pub country: Option<[u8; 2]>,
    pub location: Option<(f64, f64)>,
}

pub struct GeoDb {
    reader: maxminddb::Reader<Vec<u8>>,
}

#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow, default)]
    country: Option<Named<'a>>,
    #[serde(borrow, default)]
    registered_country: Option<Named<'a>>,
    #[serde(borrow, default)]
    continent: Option<Continent<'a>>,
    #[serde(default)]
    location: Option<Location>,
}

#[derive(Deserialize)]
struct Named<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct Continent<'a> {
    #[serde(borrow, default)]
    code: Option<&'a str>,
}

#[derive(Deserialize)]
struct Location {
    #[serde(default)]
    latitude: Option<f64>,
    #[serde(default)]
    longitude: Option<f64>,
}

fn iso2(s: &str) -> Option<[u8; 2]> {
    match s.as_bytes() {
        [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
            Some([a.to_ascii_uppercase(), b.to_ascii_uppercase()])
        }
        _ => None,
    }
}

impl GeoDb {
    pub fn open(path: &Path) -> Result<GeoDb, String> {
        let reader = maxminddb::Reader::open_readfile(path)
            .map_err(|e| format!("{}: not a readable MaxMind DB: {e}", path.display()))?;
        Ok(GeoDb { reader })
    }

    pub fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    /// The client's place, or `None` when the database has nothing for it.
    pub fn lookup(&self, ip: IpAddr) -> Option<Place> {
        let rec: Record = self
            .reader
            .lookup(ip.to_canonical())
            .ok()?
            .decode()
            .ok()??;
        let country = rec
            .country
            .and_then(|c| c.iso_code)
            .or(rec.registered_country.and_then(|c| c.iso_code))
            .and_then(iso2);
        let location = match rec.location {
            Some(Location {
                latitude: Some(lat),
                longitude: Some(lon),
            }) => Some((lat, lon)),
            // a Country database: the country's, else the continent's, representative point
            _ => country
                .and_then(country_point)
                .or_else(|| rec.continent.and_then(|c| c.code).and_then(continent_point)),
        };
        if country.is_none() && location.is_none() {
            return None;
        }
        Some(Place { country, location })
    }
}

/// Great-circle distance in kilometres (haversine).
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    const R: f64 = 6371.0;
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * R * h.sqrt().asin()
}

/// A data center as the router sees it.
#[derive(Debug, Clone)]
pub struct Site {
    pub location: (f64, f64),
    pub countries: Vec<[u8; 2]>,
}

/// Up to this many pools per color are ordered; more are served in listed order after them.
pub const MAX_POOLS: usize = 16;

/// The order in which `sites` (a route's pools of one color, as listed) should serve a client
/// at `place`: pinned first, then by distance; with no place, the listed order.
pub fn order(sites: &[Option<Site>], place: Option<&Place>) -> ([u8; MAX_POOLS], usize) {
    let n = sites.len().min(MAX_POOLS);
    let mut idx = [0u8; MAX_POOLS];
    for (i, slot) in idx.iter_mut().enumerate().take(n) {
        *slot = i as u8;
    }
    let Some(place) = place else {
        return (idx, n);
    };
    let pinned = |s: &Site| place.country.is_some_and(|c| s.countries.contains(&c));
    // the reference point: the client's location, else a pinned site's
    let from = place.location.or_else(|| {
        sites
            .iter()
            .flatten()
            .find(|s| pinned(s))
            .map(|s| s.location)
    });
    let key = |i: u8| -> (bool, f64) {
        match &sites[usize::from(i)] {
            Some(s) => (
                !pinned(s),
                from.map_or(f64::MAX, |f| distance_km(f, s.location)),
            ),
            None => (true, f64::MAX),
        }
    };
    idx[..n].sort_by(|a, b| {
        let (ka, kb) = (key(*a), key(*b));
        ka.0.cmp(&kb.0).then(ka.1.total_cmp(&kb.1))
    });
    (idx, n)
}

/// Representative points of countries, for Country databases (a small table; others fall
/// back to their continent).
fn country_point(c: [u8; 2]) -> Option<(f64, f64)> {
    Some(match &c {
        b"US" => (39.8, -98.6),
        b"CA" => (56.1, -106.3),
        b"MX" => (23.6, -102.6),
        b"BR" => (-14.2, -51.9),
        b"AR" => (-38.4, -63.6),
        b"GB" => (54.0, -2.0),
        b"IE" => (53.4, -8.2),
        b"FR" => (46.2, 2.2),
        b"DE" => (51.2, 10.5),
        b"NL" => (52.1, 5.3),
        b"BE" => (50.5, 4.5),
        b"ES" => (40.5, -3.7),
        b"PT" => (39.4, -8.2),
        b"IT" => (41.9, 12.6),
        b"CH" => (46.8, 8.2),
        b"AT" => (47.5, 14.6),
        b"PL" => (51.9, 19.1),
        b"SE" => (60.1, 18.6),
        b"NO" => (60.5, 8.5),
        b"FI" => (61.9, 25.7),
        b"DK" => (56.3, 9.5),
        b"IS" => (64.9, -19.0),
        b"RU" => (61.5, 105.3),
        b"UA" => (48.4, 31.2),
        b"TR" => (39.0, 35.2),
        b"IL" => (31.0, 34.9),
        b"AE" => (23.4, 53.8),
        b"SA" => (23.9, 45.1),
        b"IN" => (20.6, 79.0),
        b"CN" => (35.9, 104.2),
        b"JP" => (36.2, 138.3),
        b"KR" => (35.9, 127.8),
        b"SG" => (1.35, 103.8),
        b"ID" => (-0.8, 113.9),
        b"AU" => (-25.3, 133.8),
        b"NZ" => (-40.9, 174.9),
        b"ZA" => (-30.6, 22.9),
        b"NG" => (9.1, 8.7),
        b"EG" => (26.8, 30.8),
        b"KE" => (-0.02, 37.9),
        _ => return None,
    })
}

fn continent_point(code: &str) -> Option<(f64, f64)> {
    Some(match code {
        "EU" => (50.0, 10.0),
        "NA" => (40.0, -100.0),
        "SA" => (-15.0, -60.0),
        "AS" => (35.0, 100.0),
        "AF" => (5.0, 20.0),
        "OC" => (-25.0, 135.0),
        "AN" => (-80.0, 0.0),
        _ => return None,
    })
}

/// One entry of a demo database.
pub struct DemoEntry {
    pub network: &'static str,
    pub city: &'static str,
    pub country: &'static str,
    pub continent: &'static str,
    pub location: Option<(f64, f64)>,
}

/// The networks of the demo database: documentation ranges (RFC 5737, RFC 3849) and loopback
/// test addresses, placed in a few cities.
pub const DEMO: &[DemoEntry] = &[
    DemoEntry {
        network: "203.0.113.0/28",
        city: "Dublin",
        country: "IE",
        continent: "EU",
        location: Some((53.35, -6.26)),
    },
    DemoEntry {
        network: "198.51.100.0/28",
        city: "New York",
        country: "US",
        continent: "NA",
        location: Some((40.71, -74.01)),
    },
    DemoEntry {
        network: "192.0.2.0/28",
        city: "Frankfurt",
        country: "DE",
        continent: "EU",
        location: Some((50.11, 8.68)),
    },
    DemoEntry {
        network: "192.0.2.16/28",
        city: "Reykjavik",
        country: "IS",
        continent: "EU",
        location: Some((64.15, -21.94)),
    },
    DemoEntry {
        network: "198.51.100.16/28",
        city: "San Francisco",
        country: "US",
        continent: "NA",
        location: Some((37.77, -122.42)),
    },
    DemoEntry {
        network: "203.0.113.16/28",
        city: "Tokyo",
        country: "JP",
        continent: "AS",
        location: Some((35.68, 139.69)),
    },
    DemoEntry {
        network: "203.0.113.32/28",
        city: "",
        country: "FR",
        continent: "EU",
        location: None,
    },
    DemoEntry {
        network: "127.0.0.2/32",
        city: "Dublin",
        country: "IE",
        continent: "EU",
        location: Some((53.35, -6.26)),
    },
    DemoEntry {
        network: "127.0.0.3/32",
        city: "New York",
        country: "US",
        continent: "NA",
        location: Some((40.71, -74.01)),
    },
    DemoEntry {
        network: "127.0.0.4/32",
        city: "Frankfurt",
        country: "DE",
        continent: "EU",
        location: Some((50.11, 8.68)),
    },
    DemoEntry {
        network: "2001:db8::/48",
        city: "Dublin",
        country: "IE",
        continent: "EU",
        location: Some((53.35, -6.26)),
    },
    DemoEntry {
        network: "2001:db8:1::/48",
        city: "New York",
        country: "US",
        continent: "NA",
        location: Some((40.71, -74.01)),
    },
];

#[derive(serde::Serialize)]
struct WNames<'a> {
    en: &'a str,
}
#[derive(serde::Serialize)]
struct WCity<'a> {
    names: WNames<'a>,
}
#[derive(serde::Serialize)]
struct WCode<'a> {
    code: &'a str,
}
#[derive(serde::Serialize)]
struct WCountry<'a> {
    iso_code: &'a str,
}
#[derive(serde::Serialize)]
struct WLocation {
    latitude: f64,
    longitude: f64,
}
#[derive(serde::Serialize)]
struct WRecord<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    city: Option<WCity<'a>>,
    continent: WCode<'a>,
    country: WCountry<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    location: Option<WLocation>,
}

/// Writes a MaxMind DB (City layout, IPv6 tree with IPv4 under `::/96`) holding `entries`.
pub fn write_db(path: &Path, entries: &[DemoEntry]) -> Result<(), String> {
    use maxminddb_writer::paths::IpAddrWithMask;
    let mut db = maxminddb_writer::Database::default();
    db.metadata.ip_version = maxminddb_writer::metadata::IpVersion::V6;
    db.metadata.database_type = "sluice-demo-City".into();
    db.metadata.binary_format_major_version = 2;
    db.metadata.binary_format_minor_version = 0;
    db.metadata.languages = vec!["en".into()];
    db.metadata.description.insert(
        "en".into(),
        "sluice demo geo database (documentation ranges)".into(),
    );
    db.metadata.build_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for e in entries {
        let rec = WRecord {
            city: (!e.city.is_empty()).then_some(WCity {
                names: WNames { en: e.city },
            }),
            continent: WCode { code: e.continent },
            country: WCountry {
                iso_code: e.country,
            },
            location: e.location.map(|(latitude, longitude)| WLocation {
                latitude,
                longitude,
            }),
        };
        let data = db.insert_value(&rec).map_err(|e| e.to_string())?;
        let net: ipnet::IpNet = e
            .network
            .parse()
            .map_err(|_| format!("bad network {}", e.network))?;
        // IPv4 lives under ::/96 in an IPv6 tree, where readers look for it
        let (addr, len) = match net {
            ipnet::IpNet::V4(n) => (
                IpAddr::V6(n.network().to_ipv6_compatible()),
                n.prefix_len() + 96,
            ),
            ipnet::IpNet::V6(n) => (IpAddr::V6(n.network()), n.prefix_len()),
        };
        let path: IpAddrWithMask = format!("{addr}/{len}")
            .parse()
            .map_err(|_| format!("bad network {}", e.network))?;
        db.insert_node(path, data);
    }
    let tmp = path.with_extension("mmdb.tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    db.write_to(std::io::BufWriter::new(file))
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo_db() -> (tempfile::TempDir, GeoDb) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("demo.mmdb");
        write_db(&p, DEMO).expect("write");
        let db = GeoDb::open(&p).expect("open");
        (dir, db)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn demo_database_round_trip() {
        let (_d, db) = demo_db();
        let dublin = db.lookup(ip("203.0.113.5")).expect("dublin");
        assert_eq!(dublin.country, Some(*b"IE"));
        assert_eq!(dublin.location, Some((53.35, -6.26)));
        assert_eq!(
            db.lookup(ip("127.0.0.3")).and_then(|p| p.country),
            Some(*b"US")
        );
        assert_eq!(
            db.lookup(ip("2001:db8::1")).and_then(|p| p.country),
            Some(*b"IE")
        );
        assert_eq!(
            db.lookup(ip("::ffff:198.51.100.1")).and_then(|p| p.country),
            Some(*b"US")
        );
        // country only: the country's representative point
        let fr = db.lookup(ip("203.0.113.33")).expect("fr");
        assert_eq!(fr.location, country_point(*b"FR"));
        assert_eq!(db.lookup(ip("10.1.2.3")), None);
        assert_eq!(db.lookup(ip("2001:db9::1")), None);
    }

    #[test]
    fn nearest_then_pinned() {
        let eu = Site {
            location: (53.34, -6.27),
            countries: vec![*b"IE", *b"GB"],
        };
        let us = Site {
            location: (39.04, -77.49),
            countries: vec![*b"IS"],
        };
        let sites = [Some(eu), Some(us)];
        let at = |lat: f64, lon: f64, c: &[u8; 2]| Place {
            country: Some(*c),
            location: Some((lat, lon)),
        };
        let first = |p: Option<&Place>| order(&sites, p).0[0];
        assert_eq!(first(Some(&at(40.71, -74.01, b"US"))), 1);
        assert_eq!(
            first(Some(&at(50.11, 8.68, b"DE"))),
            0,
            "Frankfurt is nearest to eu-west"
        );
        assert_eq!(
            first(Some(&at(64.15, -21.94, b"IS"))),
            1,
            "a pin beats distance"
        );
        assert_eq!(first(None), 0, "no place: listed order");
        let (o, n) = order(&sites, Some(&at(40.71, -74.01, b"US")));
        assert_eq!(&o[..n], &[1, 0], "the rest by distance");
        let dist = distance_km((53.35, -6.26), (40.71, -74.01));
        assert!((5100.0..5200.0).contains(&dist), "{dist}");
    }
}
