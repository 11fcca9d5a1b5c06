"""Framework-free data: the site folder layout, the synthetic generator, converters and checks."""

from .sites import DataError, Labels, SiteData, SiteDataset, SiteSplit, SliceOptions, find_cases, list_sites, load_site

__all__ = [
    "DataError",
    "Labels",
    "SiteData",
    "SiteDataset",
    "SiteSplit",
    "SliceOptions",
    "find_cases",
    "list_sites",
    "load_site",
]
