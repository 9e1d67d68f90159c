// docs/metrics.md must list exactly the metrics of exporters/metrics_table.cc,
// with the same type, labels and help. On a mismatch the test prints the rows
// to paste into the doc.
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "exporters/metrics_table.h"
#include "gtest/gtest.h"

namespace vkick {
namespace {

std::string Row(const MetricSpec& s) {
  std::vector<std::string> labels;
  for (const auto& l : s.labels) labels.push_back("`" + l + "`");
  return "| `" + s.name + "` | " + MetricTypeName(s.type) + " | " +
         (labels.empty() ? std::string("—") : absl::StrJoin(labels, ", ")) + " | " + s.help +
         " |";
}

TEST(MetricsDocTest, DocMatchesTable) {
  const std::string path = std::string(VKICK_SOURCE_DIR) + "/docs/metrics.md";
  std::ifstream in(path);
  ASSERT_TRUE(in) << "cannot read " << path;
  std::map<std::string, std::string> doc_rows;  // name -> row
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("| `vkick_", 0) != 0) continue;
    std::string name = line.substr(3, line.find('`', 3) - 3);
    EXPECT_TRUE(doc_rows.emplace(name, line).second) << "duplicate row for " << name;
  }
  std::string expected_rows;
  bool ok = true;
  for (const MetricSpec& s : MetricTable()) {
    expected_rows += Row(s) + "\n";
    auto it = doc_rows.find(s.name);
    if (it == doc_rows.end()) {
      ADD_FAILURE() << s.name << " is exported but missing from docs/metrics.md";
      ok = false;
      continue;
    }
    if (it->second != Row(s)) {
      ADD_FAILURE() << "docs/metrics.md row differs for " << s.name << "\n  doc:  " << it->second
                    << "\n  code: " << Row(s);
      ok = false;
    }
    doc_rows.erase(it);
  }
  for (const auto& [name, row] : doc_rows) {
    ADD_FAILURE() << name << " is documented but not exported";
    ok = false;
  }
  if (!ok) ADD_FAILURE() << "The table rows from the code:\n" << expected_rows;
}

}  // namespace
}  // namespace vkick
