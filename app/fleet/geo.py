"""Where a client is: an explicit region (the X-Client-Region header or a Python caller's hint),
else its IP through a CIDR table and a MaxMind database; and how far apart two regions are."""

from __future__ import annotations

import ipaddress
import logging
import math
from functools import lru_cache

from app.fleet.spec import FleetSpec

logger = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Haversine distance between two points on the Earth, in kilometres."""
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi = phi2 - phi1
    dlambda = math.radians(lon2 - lon1)
    a = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlambda / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def region_distances(spec: FleetSpec) -> dict[tuple[str, str], float]:
    """Great-circle km between every pair of the spec's regions."""
    return {
        (a, b): great_circle_km(ra.latitude, ra.longitude, rb.latitude, rb.longitude)
        for a, ra in spec.regions.items()
        for b, rb in spec.regions.items()
    }


class GeoLocator:
    """Client IP -> region: the spec's CIDR blocks first (most specific wins), then the MaxMind
    database's country mapped through `geoip.country_regions`. Lookups are cached."""

    def __init__(self, spec: FleetSpec) -> None:
        self._regions = set(spec.regions)
        self._networks = sorted(
            (
                (ipaddress.ip_network(block, strict=False), region)
                for block, region in spec.geoip.cidr.items()
            ),
            key=lambda item: item[0].prefixlen,
            reverse=True,
        )
        self._countries = {k.upper(): v for k, v in spec.geoip.country_regions.items()}
        self._reader = None
        if spec.geoip.mmdb:
            import maxminddb

            # The database is read once and memory-mapped; a missing file is a config error.
            self._reader = maxminddb.open_database(spec.geoip.mmdb)
        self.lookup = lru_cache(maxsize=65536)(self._lookup)

    def known(self, region: str | None) -> str | None:
        """The region if the spec knows it (header values are client input), else None."""
        return region if region in self._regions else None

    def _lookup(self, ip: str) -> str | None:
        try:
            address = ipaddress.ip_address(ip.strip())
        except ValueError:
            return None
        for network, region in self._networks:
            if address.version == network.version and address in network:
                return region
        if self._reader is None:
            return None
        try:
            record = self._reader.get(str(address))
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        country = record.get("country") or record.get("registered_country") or {}
        code = country.get("iso_code") if isinstance(country, dict) else None
        return self._countries.get(str(code).upper()) if code else None

    def client_region(self, header_region: str | None, client_ip: str | None) -> str | None:
        """The header's region when the spec knows it, else the IP's, else None."""
        region = self.known(header_region.strip().lower() if header_region else None)
        if region is None and client_ip:
            region = self.lookup(client_ip)
        return region


def forwarded_client_ip(x_forwarded_for: str | None, peer: str | None) -> str | None:
    """The original client of a request that may have passed proxies: the first X-Forwarded-For
    entry (set by HAProxy/load balancers), else the TCP peer."""
    if x_forwarded_for:
        first = x_forwarded_for.split(",")[0].strip()
        if first:
            return first
    return peer
