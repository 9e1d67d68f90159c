# cmake --install: everything an operator installs, at FHS paths under
# CMAKE_INSTALL_PREFIX (/usr for the Debian packages, debian/rules):
#   bin/vkickd, bin/vkickctl, bin/vkick-agent       the binaries
#   share/man/man1/*.1                              man pages (help2man, from --help/--version)
#   lib/systemd/system/vkickd.service, vkick-agent.service (VKICK_SYSTEMD_UNITDIR)
#   lib/sysusers.d/vkick.conf, lib/tmpfiles.d/vkick.conf
#   lib/udev/rules.d/60-vkick-agent.rules          starts vkick-agent when its virtio-serial port appears
#   /etc/vkick/vkickd.conf                          the unit's EnvironmentFile (from vkickd.conf.example)
#   share/doc/vkick/                                README and docs/
#   share/vkick/prometheus/*.rules.yml, share/vkick/grafana/vkick-dashboard.json
# Relative directories are under the prefix given at install time
# (cmake --install build --prefix /usr); the units are written at install
# time with the binaries' and docs' paths under that prefix, so ExecStart and
# EnvironmentFile always name what was installed.
set(VKICK_SYSTEMD_UNITDIR lib/systemd/system CACHE STRING
    "systemd system units, relative to the prefix or absolute (Debian 12 packages: /lib/systemd/system)")
set(VKICK_UDEV_RULESDIR lib/udev/rules.d CACHE STRING
    "udev rules, relative to the prefix or absolute (Debian 12 packages: /lib/udev/rules.d)")
set(VKICK_SYSUSERSDIR lib/sysusers.d CACHE STRING "sysusers.d(5) files")
set(VKICK_TMPFILESDIR lib/tmpfiles.d CACHE STRING "tmpfiles.d(5) files")
# /etc whatever the prefix: the unit reads /etc/vkick/vkickd.conf.
set(VKICK_SYSCONFDIR /etc CACHE PATH "where vkick/vkickd.conf goes (the unit's EnvironmentFile)")
set(VKICK_DOCDIR ${CMAKE_INSTALL_DATADIR}/doc/vkick)
set(VKICK_DATADIR ${CMAKE_INSTALL_DATADIR}/vkick)

set(_bins vkickd vkickctl)
if(TARGET vkick-agent)
  list(APPEND _bins vkick-agent)
endif()
install(TARGETS ${_bins} RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})

# Units, with the installed paths (written at install time).
set(_unit_dir ${CMAKE_BINARY_DIR}/deploy/systemd)
set(_units vkickd.service)
if(TARGET vkick-agent)
  list(APPEND _units vkick-agent.service)
endif()
foreach(unit ${_units})
  install(CODE "
    file(READ \"${PROJECT_SOURCE_DIR}/deploy/systemd/${unit}\" _text)
    foreach(b ${_bins})
      string(REPLACE \"=/usr/bin/\${b} \" \"=\${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_BINDIR}/\${b} \" _text \"\${_text}\")
    endforeach()
    string(REPLACE \"/usr/share/doc/vkick/\" \"\${CMAKE_INSTALL_PREFIX}/${VKICK_DOCDIR}/\" _text \"\${_text}\")
    string(REPLACE \"/etc/vkick/\" \"${VKICK_SYSCONFDIR}/vkick/\" _text \"\${_text}\")
    file(WRITE \"${_unit_dir}/${unit}\" \"\${_text}\")")
  install(FILES ${_unit_dir}/${unit} DESTINATION ${VKICK_SYSTEMD_UNITDIR})
endforeach()
if(TARGET vkick-agent)
  install(FILES deploy/systemd/vkick-agent.udev.rules DESTINATION ${VKICK_UDEV_RULESDIR} RENAME 60-vkick-agent.rules)
endif()
install(FILES deploy/systemd/vkick.sysusers DESTINATION ${VKICK_SYSUSERSDIR} RENAME vkick.conf)
install(FILES deploy/systemd/vkick.tmpfiles DESTINATION ${VKICK_TMPFILESDIR} RENAME vkick.conf)
install(FILES deploy/systemd/vkickd.conf.example DESTINATION ${VKICK_SYSCONFDIR}/vkick RENAME vkickd.conf)

install(FILES README.md DESTINATION ${VKICK_DOCDIR})
install(DIRECTORY docs/ DESTINATION ${VKICK_DOCDIR} FILES_MATCHING PATTERN "*.md")
install(FILES deploy/systemd/vkickd.conf.example DESTINATION ${VKICK_DOCDIR}/examples)
install(FILES deploy/prometheus/vkick-alerts.rules.yml deploy/prometheus/vkick-recording.rules.yml
              deploy/prometheus/prometheus.yml
        DESTINATION ${VKICK_DATADIR}/prometheus)
install(FILES deploy/grafana/vkick-dashboard.json DESTINATION ${VKICK_DATADIR}/grafana)

# Man pages from --help and --version (help2man). VKICK_MANPAGES: AUTO (when
# help2man is there), ON (required: the package build), OFF.
set(VKICK_MANPAGES AUTO CACHE STRING "Generate man pages with help2man (AUTO, ON, OFF)")
find_program(VKICK_HELP2MAN help2man)
if(VKICK_MANPAGES STREQUAL "ON" AND NOT VKICK_HELP2MAN)
  message(FATAL_ERROR "VKICK_MANPAGES=ON but help2man is not installed")
endif()
if(VKICK_HELP2MAN AND NOT VKICK_MANPAGES STREQUAL "OFF")
  set(_man_vkickd "vkick host daemon: virtio kick and VM exit counters, kick batching control")
  set(_man_vkickctl "show the vkickd control loop and switch kick policies live")
  set(_man_vkick-agent "vkick guest agent: samples virtio-blk queues, applies the kick policies of the host")
  set(_pages)
  foreach(b ${_bins})
    set(_page ${CMAKE_BINARY_DIR}/man/${b}.1)
    add_custom_command(OUTPUT ${_page}
      COMMAND ${CMAKE_COMMAND} -E make_directory ${CMAKE_BINARY_DIR}/man
      COMMAND ${VKICK_HELP2MAN} --no-info --section=1 --name=${_man_${b}} --output=${_page} $<TARGET_FILE:${b}>
      DEPENDS ${b}
      COMMENT "help2man ${b}.1" VERBATIM)
    list(APPEND _pages ${_page})
  endforeach()
  add_custom_target(vkick_manpages ALL DEPENDS ${_pages})
  install(FILES ${_pages} DESTINATION ${CMAKE_INSTALL_MANDIR}/man1)
endif()
