"""What the compatibility check found: a finding per thing checked, in sections a to e,
and the report printed from them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Finding:
    ok: bool
    text: str


@dataclass
class Section:
    key: str
    title: str
    findings: list[Finding] = field(default_factory=list)
    table: list[str] = field(default_factory=list)

    def ok(self, text: str) -> None:
        self.findings.append(Finding(True, text))

    def fail(self, text: str) -> None:
        self.findings.append(Finding(False, text))


@dataclass
class Report:
    label: str
    sections: list[Section]

    @property
    def failures(self) -> list[str]:
        return [f"{s.key}. {f.text}" for s in self.sections for f in s.findings if not f.ok]

    @property
    def passed(self) -> bool:
        return not self.failures

    def render(self) -> str:
        lines = [f"== {self.label}"]
        for section in self.sections:
            lines += ["", f"{section.key}. {section.title}"]
            lines += [f"   {row}".rstrip() for row in section.table]
            lines += [f"   {'ok  ' if f.ok else 'FAIL'}  {f.text}" for f in section.findings]
        total = sum(len(s.findings) for s in self.sections)
        failures = self.failures
        lines.append("")
        if failures:
            lines.append(f"{self.label}: {len(failures)} of {total} checks FAIL:")
            lines += [f"  - {failure}" for failure in failures]
        else:
            lines.append(f"{self.label}: all {total} checks pass")
        return "\n".join(lines)
