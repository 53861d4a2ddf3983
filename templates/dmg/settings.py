# The disk image's content and Finder window, in dmgbuild's settings format
# (https://dmgbuild.readthedocs.io/en/latest/settings.html). One file for both build hosts:
#   macOS  builder.formats.dmg runs `dmgbuild.build_dmg(..., settings_file=<this>, defines=...)`.
#   Linux  builder.formats.dmg executes this file the way dmgbuild does (globals holding
#          dmgbuild's defaults and `defines`), copies `files` into the image folder, writes the
#          .DS_Store from the window settings with the ds_store package, then xorriso + UDIF.
# The Linux writer implements: format UDZO, filesystem HFS+, files, icon_locations, window_rect,
# icon_size, text_size, background (a "#rrggbb" colour or None), default_view icon-view and the
# show_* flags. It refuses anything else (icons, background images, symlinks, licenses, hiding).
#
# `defines`, given by the builder: volume_name; pkg (path) and pkg_name (its name on the image);
# readme (path); sidecar (path, or "" for none) and sidecar_name.

format = "UDZO"
filesystem = "HFS+"
volume_name = defines["volume_name"]  # noqa: F821 (dmgbuild provides `defines`)

files = [
    (defines["pkg"], defines["pkg_name"]),  # noqa: F821
    (defines["readme"], "README.txt"),  # noqa: F821
]
if defines["sidecar"]:  # noqa: F821
    # A group's enrollment beside the release pkg, read by its postinstall. The leading dot of
    # its name keeps it out of the Finder window, so it needs no icon location.
    files.append((defines["sidecar"], defines["sidecar_name"]))  # noqa: F821

default_view = "icon-view"
show_status_bar = False
show_tab_view = False
show_toolbar = False
show_pathbar = False
show_sidebar = False
# ((left, top), (width, height)) of the window on screen.
window_rect = ((200, 120), (560, 300))
icon_size = 96
text_size = 13
background = "#ffffff"
# Icon centres, in points from the window's top left.
icon_locations = {
    defines["pkg_name"]: (170, 130),  # noqa: F821
    "README.txt": (390, 130),
}
