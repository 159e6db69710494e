"""Tool-use conversations shared by the tool-calling tests."""

from __future__ import annotations

import copy
import json

TOOLS = [
    {"type": "function", "function": {
        "name": "animal_food", "description": "What an animal eats.",
        "parameters": {"type": "object", "properties": {"animal": {"type": "string"}}, "required": ["animal"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]}}},
    {"type": "function", "function": {
        "name": "convert", "description": "Convert a length.",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"}, "unit": {"type": "string", "enum": ["m", "cm", "km"]},
            "to": {"type": "string", "enum": ["m", "cm", "km"], "default": "m"}}, "required": ["value", "unit"]}}},
]


def multi_call_chat(i: int = 0) -> dict:
    """System, a question, two parallel calls (one with arguments as a JSON string), both results, the answer."""
    return {"id": f"t-{i}", "tools": copy.deepcopy(TOOLS), "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": f"What does the fox eat, and what is {i} plus 3?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "animal_food", "arguments": {"animal": "fox"}}},
            {"id": "c2", "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": i, "b": 3})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "fish"},
        {"role": "tool", "tool_call_id": "c2", "content": str(i + 3)},
        {"role": "assistant", "content": f"The fox eats fish. The answer is {i + 3}."},
    ]}


def no_tool_chat(i: int = 0) -> dict:
    """Tools declared, none fits: the assistant answers in text."""
    return {"id": f"n-{i}", "tools": copy.deepcopy(TOOLS), "messages": [
        {"role": "user", "content": f"Say hello to friend number {i}."},
        {"role": "assistant", "content": f"Hello, friend number {i}!"}]}
