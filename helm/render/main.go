// medgate-helm-render renders a Helm chart the way `helm template` does, for the chart's tests:
// Helm itself is not a Debian package. It uses the same engine (Go's text/template with the
// sprig functions) and Helm's own additions (include, tpl, required, toYaml, fromYaml, lookup),
// the chart's values.yaml deep-merged with each -f file in turn, and .Release/.Chart as Helm sets
// them for an install. Each rendered file is printed after a "# Source:" line, as Helm does; a
// template that fails (required, fail) prints its error on stderr and exits 1.
//
// usage: medgate-helm-render CHART_DIR [--release NAME] [--namespace NS] [-f VALUES.yaml]...
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	yaml2 "gopkg.in/yaml.v2"
	"gopkg.in/yaml.v3"
)

func loadYAML(path string) (map[string]interface{}, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	out := map[string]interface{}{}
	if err := yaml.Unmarshal(data, &out); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return out, nil
}

// jsonable turns yaml.v2's map[interface{}]interface{} into maps JSON can encode.
func jsonable(v interface{}) interface{} {
	switch t := v.(type) {
	case map[interface{}]interface{}:
		out := map[string]interface{}{}
		for k, e := range t {
			out[fmt.Sprint(k)] = jsonable(e)
		}
		return out
	case []interface{}:
		for i, e := range t {
			t[i] = jsonable(e)
		}
	}
	return v
}

// loadValues reads a values file as Helm does (sigs.k8s.io/yaml): YAML 1.1, so that NO, ON or Y
// are booleans, converted to JSON and decoded from it, so that every number is a float64 (printed
// as 4.194304e+06 unless a template converts it).
func loadValues(path string) (map[string]interface{}, error) {
	text, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var parsed interface{}
	if err := yaml2.Unmarshal(text, &parsed); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if parsed == nil {
		parsed = map[string]interface{}{}
	}
	data, err := json.Marshal(jsonable(parsed))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	out := map[string]interface{}{}
	if err := json.Unmarshal(data, &out); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return out, nil
}

// merge sets every key of src into dst, merging maps key by key; a null in src deletes the key,
// as Helm does with user-supplied values.
func merge(dst, src map[string]interface{}) {
	for k, v := range src {
		if v == nil {
			delete(dst, k)
			continue
		}
		srcMap, srcIsMap := v.(map[string]interface{})
		dstMap, dstIsMap := dst[k].(map[string]interface{})
		if srcIsMap && dstIsMap {
			merge(dstMap, srcMap)
		} else {
			dst[k] = v
		}
	}
}

// blockStyle undoes the flow style that YAML parsed from JSON keeps.
func blockStyle(n *yaml.Node) {
	n.Style &^= yaml.FlowStyle
	for _, c := range n.Content {
		blockStyle(c)
	}
}

// toYAML is Helm's: through JSON (sigs.k8s.io/yaml), so keys are sorted and a float64 that holds
// an integer prints as one; two-space indents; no trailing newline.
func toYAML(v interface{}) string {
	data, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	var node yaml.Node
	if err := yaml.Unmarshal(data, &node); err != nil {
		return ""
	}
	blockStyle(&node)
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(&node); err != nil {
		return ""
	}
	enc.Close()
	return strings.TrimSuffix(buf.String(), "\n")
}

func fromYAML(s string) map[string]interface{} {
	out := map[string]interface{}{}
	if err := yaml.Unmarshal([]byte(s), &out); err != nil {
		out["Error"] = err.Error()
	}
	return out
}

func required(message string, value interface{}) (interface{}, error) {
	if value == nil {
		return nil, errors.New(message)
	}
	if s, ok := value.(string); ok && s == "" {
		return nil, errors.New(message)
	}
	return value, nil
}

func run(args []string) error {
	if len(args) < 1 {
		return errors.New("usage: medgate-helm-render CHART_DIR [--release NAME] [--namespace NS] [-f VALUES.yaml]...")
	}
	chartDir := args[0]
	release, namespace := "medgate", "default"
	var valueFiles []string
	for i := 1; i < len(args); i++ {
		if i+1 >= len(args) {
			return fmt.Errorf("%s: needs a value", args[i])
		}
		switch args[i] {
		case "--release":
			release = args[i+1]
		case "--namespace":
			namespace = args[i+1]
		case "-f":
			valueFiles = append(valueFiles, args[i+1])
		default:
			return fmt.Errorf("unknown argument %q", args[i])
		}
		i++
	}

	chartMeta, err := loadYAML(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return err
	}
	chart := map[string]interface{}{}
	for k, v := range chartMeta {
		// Helm exposes Chart.yaml's fields capitalised: .Chart.Name, .Chart.AppVersion.
		chart[strings.ToUpper(k[:1])+k[1:]] = v
	}
	values, err := loadValues(filepath.Join(chartDir, "values.yaml"))
	if err != nil {
		return err
	}
	for _, f := range valueFiles {
		override, err := loadValues(f)
		if err != nil {
			return err
		}
		merge(values, override)
	}

	chartName, _ := chart["Name"].(string)
	templatesDir := filepath.Join(chartDir, "templates")
	entries, err := os.ReadDir(templatesDir)
	if err != nil {
		return err
	}
	funcs := sprig.TxtFuncMap()
	// Helm takes these out: a chart may not read the renderer's environment.
	delete(funcs, "env")
	delete(funcs, "expandenv")
	root := template.New("chart").Option("missingkey=zero")
	funcs["toYaml"] = toYAML
	funcs["fromYaml"] = fromYAML
	funcs["required"] = required
	funcs["lookup"] = func(string, string, string, string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil // as `helm template`: no cluster to look in
	}
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	funcs["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Parse(text)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		if err := t.Execute(&buf, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	root.Funcs(funcs)

	var names []string
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		name := chartName + "/templates/" + e.Name()
		text, err := os.ReadFile(filepath.Join(templatesDir, e.Name()))
		if err != nil {
			return err
		}
		if _, err := root.New(name).Parse(string(text)); err != nil {
			return err
		}
		if !strings.HasPrefix(e.Name(), "_") && (strings.HasSuffix(e.Name(), ".yaml") ||
			strings.HasSuffix(e.Name(), ".yml") || strings.HasSuffix(e.Name(), ".txt")) {
			names = append(names, name)
		}
	}
	sort.Strings(names)

	var out bytes.Buffer
	for _, name := range names {
		if strings.HasSuffix(name, "NOTES.txt") {
			continue // shown after an install, not a manifest
		}
		data := map[string]interface{}{
			"Values": values,
			"Chart":  chart,
			"Release": map[string]interface{}{
				"Name": release, "Namespace": namespace, "Service": "Helm",
				"IsInstall": true, "IsUpgrade": false, "Revision": 1,
			},
			"Capabilities": map[string]interface{}{
				"KubeVersion": map[string]interface{}{"Version": "v1.29.0", "Major": "1", "Minor": "29"},
			},
			"Template": map[string]interface{}{"Name": name, "BasePath": chartName + "/templates"},
		}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, data); err != nil {
			return err
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if strings.TrimSpace(text) == "" {
			continue
		}
		// Each rendered file may hold several documents; each gets its Source line.
		for _, doc := range strings.Split(text, "\n---") {
			doc = strings.TrimPrefix(doc, "---")
			if strings.TrimSpace(doc) == "" {
				continue
			}
			fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", name, strings.Trim(doc, "\n"))
		}
	}
	_, err = os.Stdout.Write(out.Bytes())
	return err
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
}
