include(GoogleTest)

# vkick_gtest(<name> SOURCES ... LIBS ... [LABELS ...])
# A GoogleTest binary registered with CTest test-by-test. Tests that need a
# capability the machine lacks call GTEST_SKIP() with the reason; CTest reports
# them as skipped (never as passed).
function(vkick_gtest name)
  cmake_parse_arguments(T "" "TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${T_SOURCES})
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  target_link_libraries(${name} PRIVATE ${T_LIBS} GTest::gtest GTest::gmock GTest::gtest_main)
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 120)
  endif()
  if(NOT T_LABELS)
    set(T_LABELS unit)
  endif()
  gtest_discover_tests(${name}
    DISCOVERY_TIMEOUT 30
    PROPERTIES LABELS "${T_LABELS}" TIMEOUT ${T_TIMEOUT}
               SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]")
endfunction()

# vkick_script_test(<name> COMMAND ... [LABELS ...] [TIMEOUT s])
# An integration test driven by a script; exit 77 means "skipped, reason printed".
function(vkick_script_test name)
  cmake_parse_arguments(T "" "TIMEOUT" "COMMAND;LABELS" ${ARGN})
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 600)
  endif()
  if(NOT T_LABELS)
    set(T_LABELS integration)
  endif()
  add_test(NAME ${name} COMMAND ${T_COMMAND})
  set_tests_properties(${name} PROPERTIES
    LABELS "${T_LABELS}" TIMEOUT ${T_TIMEOUT} SKIP_RETURN_CODE 77 RUN_SERIAL TRUE
    ENVIRONMENT "VKICK_BUILD_DIR=${CMAKE_BINARY_DIR};VKICK_SOURCE_DIR=${CMAKE_SOURCE_DIR}")
endfunction()
