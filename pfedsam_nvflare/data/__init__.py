"""Framework-free data: the site folder layout, reading, preprocessing, splits, the synthetic generator,
converters and checks."""

from .layout import Case, DataError, Labels, find_cases, list_sites
from .preprocess import SliceOptions
from .sites import SiteData, SiteDataset, load_site
from .splits import SiteSplit

__all__ = [
    "Case",
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
